/* fuzz_cfg: libFuzzer harness for the config.json reader. Any input must be
 * rejected with a message or give a geometry the engine can allocate from:
 * positive sizes, heads dividing widths, patch dividing image size.
 * Seeds: tests/fuzz/corpus_cfg/. */
#include "blip_cfg.h"
#include "blip_err.h"

#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  blip_cfg c;
  if (blip_cfg_parse((const char *)data, size, &c) != BLIP_OK) {
    if (!blip_err_last()[0]) abort();
    return 0;
  }
  if (c.v_hidden <= 0 || c.v_heads <= 0 || c.v_hidden % c.v_heads || c.t_hidden % c.t_heads || c.image_size % c.patch ||
      c.v_tokens != (c.image_size / c.patch) * (c.image_size / c.patch) + 1 || c.embed_dim <= 0 || c.t_max_pos < 2 ||
      !(c.v_eps > 0) || !(c.t_eps > 0) || c.bos_id + 1 >= c.t_vocab)
    abort();
  return 0;
}

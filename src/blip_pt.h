/* blip_pt: PyTorch checkpoints (torch.save's zip format, e.g.
 * pytorch_model.bin) read safely, as a blip_st tensor set.
 *
 * The zip is read with libzip; ARCHIVE/data.pkl is interpreted by a
 * restricted unpickler that knows only what a state dict uses: dicts
 * (collections.OrderedDict, with its _metadata state), tuples, lists,
 * numbers, strings, storages as persistent ids ('storage', torch.XStorage,
 * key, location, numel), torch._utils._rebuild_tensor_v2 and
 * _rebuild_parameter. Any other global (os.system, builtins.eval, ...) or
 * opcode is refused with BLIP_EUNSUPPORTED naming it: nothing is imported
 * or executed. Tensors (views with offsets and strides, storages shared
 * between tensors) are copied out contiguous, in state-dict order, into
 * one safetensors image in memory, so that the result behaves exactly like
 * a safetensors file with the same tensors. Non-tensor entries are
 * skipped. Legacy (pre-1.6, non-zip) files and big-endian archives are
 * refused. Every length and index is checked (fuzzed: tests/fuzz/fuzz_pt.c). */
#ifndef BLIP_PT_H
#define BLIP_PT_H

#include <stddef.h>

#include "blip_st.h"

/* Read a torch.save zip from a file or a caller buffer (fuzzers, tests). */
int blip_pt_load(const char *path, blip_st **out);
int blip_pt_parse(const void *buf, size_t len, blip_st **out);

/* A weights file of either kind: torch.save zip (by its "PK\3\4" magic) or
 * safetensors. */
int blip_pt_open_weights(const char *path, blip_st **out);

#endif

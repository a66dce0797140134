/* blip_tok: BERT WordPiece tokenizer (bert-base-uncased, as BLIP sets it up)
 * and BLIP's pre_caption caption cleaner.
 *
 * Matches Hugging Face's slow BertTokenizer with do_lower_case=True,
 * tokenize_chinese_chars=True, plus the added tokens [DEC] (id = vocab
 * lines) and [ENC] (id = vocab lines + 1). Special tokens written literally
 * in the text ([CLS], [SEP], [PAD], [MASK], [UNK], [DEC], [ENC]) are matched
 * case-sensitively before normalization, as HF does. Unicode via utf8proc.
 * Invalid UTF-8 never crashes: bytes that do not decode are dropped. */
#ifndef BLIP_TOK_H
#define BLIP_TOK_H

#include <stddef.h>
#include <stdint.h>

enum { BLIP_TOK_PAD = 0, BLIP_TOK_UNK = 100, BLIP_TOK_CLS = 101, BLIP_TOK_SEP = 102, BLIP_TOK_MASK = 103 };

typedef struct blip_tok blip_tok;

/* Load vocab.txt (one token a line). Fails with BLIP_EFORMAT if [PAD], [UNK],
 * [CLS] or [SEP] are missing or not at their BERT ids. */
int blip_tok_load(const char *vocab_path, blip_tok **out);
int blip_tok_load_mem(const char *buf, size_t len, blip_tok **out);
void blip_tok_free(blip_tok *t);

int blip_tok_size(const blip_tok *t);      /* vocab lines + 2 added tokens */
int blip_tok_dec_id(const blip_tok *t);    /* [DEC] */
int blip_tok_enc_id(const blip_tok *t);    /* [ENC] */
int blip_tok_id(const blip_tok *t, const char *token); /* -1 if absent */
const char *blip_tok_token(const blip_tok *t, int id); /* NULL if out of range */

/* Encode text (len bytes) as [CLS] pieces [SEP]. max_len > 0 truncates to
 * max_len ids keeping [SEP] last (HF truncation); 0 = no limit. Writes at most
 * cap ids (cap < the result truncates the same way); *n_out = ids written,
 * *n_full = length before truncation. No padding: the mask is 1 for the first
 * *n_out positions (a literal "[PAD]" in text is id 0 with mask 1). */
int blip_tok_encode(const blip_tok *t, const char *text, size_t len, int max_len, int32_t *ids, int cap,
                    int *n_out, int *n_full);

/* ids -> text as HF's BertTokenizer.decode(ids, skip_special_tokens) with
 * clean_up_tokenization_spaces (v4.38). *out is malloc'd. */
int blip_tok_decode(const blip_tok *t, const int32_t *ids, int n, int skip_special, char **out);

/* BLIP data/utils.py pre_caption(caption, max_words), max_words >= 1. *out is
 * malloc'd and NUL-terminated; *out_len (if not NULL) is its length in bytes,
 * which exceeds strlen(*out) only when text holds a NUL (kept, as Python keeps
 * it). Feed *out, *out_len to blip_tok_encode. */
int blip_tok_pre_caption(const char *text, size_t len, int max_words, char **out, size_t *out_len);

#endif

/* blip_out: what the tools print about names they do not control (file
 * names, query lines, captions), in one place for every tool.
 *
 * - Terminals and TSV fields get one escaping rule, so a name can neither
 *   drive the terminal (ESC sequences, C1 controls) nor split a TSV row:
 *   backslash -> "\\", tab -> "\t", newline -> "\n", carriage return -> "\r",
 *   every other C0 control, DEL, C1 control (U+0080..U+009F) and byte that is
 *   not part of valid UTF-8 -> "\xNN" per byte. Valid UTF-8 text is printed
 *   as is. The escaped form is valid UTF-8 and decodes to the exact bytes.
 * - JSON never drops a key: a name is written as two keys, KEY (UTF-8 text;
 *   each byte of an invalid UTF-8 sequence becomes U+FFFD) and KEY_b64
 *   (null when KEY is the exact name, else the name's bytes in base64, RFC
 *   4648 with padding). A number that is not finite (NaN, inf) is null. */
#ifndef BLIP_OUT_H
#define BLIP_OUT_H

#include <jansson.h>
#include <stddef.h>
#include <stdio.h>

/* Bytes of the valid UTF-8 sequence at s[0..n) (1..4), or 0 when s[0] does
 * not start one (overlong forms, surrogates and > U+10FFFF are invalid). */
int blip_out_utf8_seq(const unsigned char *s, size_t n);
int blip_out_utf8_valid(const char *s);

/* The escaped form of s written to f, whole. */
void blip_out_fesc(FILE *f, const char *s);
/* The inverse: the bytes that escaped text e stands for into out (room for
 * strlen(e) + 1), NUL-ended; returns their count, or -1 for a sequence the
 * rule never writes (a lone '\\', an unknown escape, a bad \x). */
long blip_out_unesc(const char *e, char *out);
/* "tool: MESSAGE\n" on stderr with MESSAGE escaped (messages quote names). */
void blip_out_error(const char *tool, const char *msg);

/* JSON text of s (lossy as above; never NULL unless out of memory). */
json_t *blip_out_json_text(const char *s);
/* Set obj[key] and obj[key "_b64"] for the name s (see above). s may be NULL:
 * both null. Returns 0, or -1 when out of memory. */
int blip_out_json_name(json_t *obj, const char *key, const char *s);
/* v, or null when v is not finite. */
json_t *blip_out_json_num(double v);

#endif

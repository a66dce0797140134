/* blip_arg: strict parsing of the values given to the tools' options, one
 * parser for every tool, so that no value is silently read as something
 * else: "" or "12abc" is not a number, 4294967297 does not wrap to 1, a date
 * names a real calendar day, a thread count has an upper bound.
 * Each function returns BLIP_OK or BLIP_EINVAL with a message that names the
 * option and the value (the tools print it and exit 2). */
#ifndef BLIP_ARG_H
#define BLIP_ARG_H

#define BLIP_ARG_THREADS_PER_CORE 4 /* --threads at most this many per core */

/* Decimal integer (optional sign, digits only, no spaces) in [min, max]. */
int blip_arg_long(const char *opt, const char *s, long long min, long long max, long long *out);
int blip_arg_int(const char *opt, const char *s, int min, int max, int *out);
/* For the benchmarks' and helpers' option loops: the value of blip_arg_long,
 * or "tool: message" on stderr and exit(2). */
long long blip_arg_must(const char *tool, const char *opt, const char *s, long long min, long long max);
/* Finite decimal number in [min, max]. */
int blip_arg_real(const char *opt, const char *s, double min, double max, double *out);
/* Thread count in 1..blip_arg_max_threads(). */
int blip_arg_threads(const char *opt, const char *s, int *out);
int blip_arg_max_threads(void);
/* "YYYY-MM-DD", "YYYY-MM-DDTHH:MM[:SS]" (or a space for T), a real day and
 * time (leap years counted) -> out[20] "YYYY-MM-DDTHH:MM:SS". */
int blip_arg_date(const char *opt, const char *s, char out[20]);
/* path names a regular file (stat, follows links): a FIFO, device or folder
 * given as an image would block or fail inside the decoder. BLIP_EIO when it
 * cannot be stat'ed. */
int blip_arg_regular_file(const char *path);

#endif

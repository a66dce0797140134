/* blip_img: decode any photo with libvips and preprocess it exactly as BLIP
 * does: PIL convert("RGB"), PIL bicubic squash to SxS (no crop), /255,
 * CLIP mean/std normalization, CHW float32.
 *
 * Every failure (unsupported, truncated, corrupt, too large, unreadable,
 * over the time budget) returns a BLIP_E* code with a message; nothing
 * aborts the process, leaks memory or leaks a file descriptor.
 * Call blip_img_init() once per process before any threads start. */
#ifndef BLIP_IMG_H
#define BLIP_IMG_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
  int size;               /* output side S (config image_size) */
  int autorotate;         /* apply EXIF orientation (photo libraries: 1; benchmarks: 0) */
  int shrink_on_load;     /* fast inexact path for big JPEGs (off wherever recall is measured) */
  int64_t max_pixels;     /* decompression-bomb guard on width*height */
  int64_t max_file_bytes; /* refuse larger files */
  double time_budget_s;   /* per-image decode+preprocess budget */
  int color_manage;       /* non-sRGB ICC profiles -> sRGB (photo libraries: 1; the PIL reference ignores
                           * profiles). CMYK goes through an ICC profile unless reference is set. */
  int reference;          /* 1: reproduce PIL's Image.open(f).convert("RGB") byte for byte, as BLIP's
                           * evaluation decodes (blip-eval, fidelity checks). Overrides autorotate and
                           * color_manage (shrink_on_load must be 0): no ICC, naive CMYK, 16-bit grey clipped
                           * at 255, PNM scaled by maxval, GIF transparent pixels keep their palette
                           * colour, TIFF Orientation applied, EXIF orientation ignored. README.md,
                           * "Reference mode", lists every difference from the default (product) mode. */
  /* Called once the header is read, before any pixel is decoded, with the
   * bytes the decode will hold at its peak; a non-zero return (a BLIP_E*
   * code, message set) ends the load. The decode pool's memory budget. NULL: none. */
  int (*admit)(void *ctx, int64_t bytes);
  void *admit_ctx;
} blip_img_opts;

/* Formats by magic bytes. Only the photo formats are decoded (BMP is
 * recognised, then refused: see blip_img.c). */
typedef enum {
  BLIP_IMG_UNKNOWN = 0,
  BLIP_IMG_JPEG,
  BLIP_IMG_PNG,
  BLIP_IMG_GIF,
  BLIP_IMG_TIFF,
  BLIP_IMG_WEBP,
  BLIP_IMG_HEIF, /* HEIC and AVIF (ISO-BMFF with a HEIF/AVIF brand) */
  BLIP_IMG_BMP,
  BLIP_IMG_PNM, /* PBM/PGM/PPM (libvips' own parser) */
} blip_img_format;

/* What one open descriptor said about a file. */
typedef struct {
  int64_t size, mtime_ns;
  uint64_t dev, ino;
} blip_img_stat;

typedef struct {
  int width, height;     /* as stored in the file, before orientation */
  int orientation;       /* EXIF orientation 1..8 (1 when absent) */
  char taken_at[20];     /* EXIF DateTimeOriginal "YYYY-MM-DDTHH:MM:SS", or "" when none */
} blip_img_meta;

/* Defaults: size 384, autorotate on, exact path, 250 Mpx, 1 GiB, 60 s, colour managed, product mode. */
void blip_img_opts_default(blip_img_opts *o);

/* Start libvips once (idempotent, thread-safe after the first call). */
int blip_img_init(void);

/* Decode a file and preprocess it into out[3*S*S] (CHW, normalized).
 * rgb (may be NULL) receives the SxS 8-bit RGB image before normalization.
 * meta (may be NULL) receives the metadata. */
int blip_img_load_file(const char *path, const blip_img_opts *o, float *out, uint8_t *rgb, blip_img_meta *meta);
int blip_img_load_buffer(const void *buf, size_t len, const blip_img_opts *o, float *out, uint8_t *rgb,
                         blip_img_meta *meta);
/* load_buffer with the file name to use in messages. */
int blip_img_load_memory(const void *buf, size_t len, const char *name, const blip_img_opts *o, float *out,
                         uint8_t *rgb, blip_img_meta *meta);

/* The format of buf[0..n) by its magic bytes. *name (may be NULL) gets a
 * display name, also for some recognised formats that are not decoded
 * (JPEG 2000, SVG, PDF, ...), else NULL. */
blip_img_format blip_img_sniff(const void *buf, size_t n, const char **name);
/* Walk a PNG's chunks: every declared length must fit in the n bytes held,
 * and no text chunk may exceed 16 MiB. BLIP_OK, or BLIP_EFORMAT ("truncated"
 * / "corrupt") or BLIP_EUNSUPPORTED (huge text) naming the chunk. */
int blip_img_png_check(const void *buf, size_t n, const char *name);
/* Open path for reading without blocking (a FIFO never hangs): regular,
 * non-empty files up to max_bytes only; *info gets that descriptor's fstat. */
int blip_img_open(const char *path, int64_t max_bytes, int *fd, blip_img_stat *info);
/* Read exactly len bytes at offset off; a file that shrank is an error. */
int blip_img_read_fd(int fd, const char *path, void *dst, size_t len, int64_t off);

/* PIL-exact bicubic resize of packed 8-bit RGB (w x h) to (ow x oh). */
int blip_img_resize_rgb(const uint8_t *src, int w, int h, uint8_t *dst, int ow, int oh);

/* ((rgb/255) - mean)/std in float32, HWC u8 -> CHW f32, exactly as upstream. */
void blip_img_normalize(const uint8_t *rgb, int s, float *out);

/* Preprocessed pixels from "FILE.safetensors:TENSOR", F32 [N,3,S,S]
 * (tools' --pixels). *out is malloc'd, *n = N. */
int blip_img_load_pixels(const char *spec, int S, float **out, int *n);

#endif

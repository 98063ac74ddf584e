/*
 * The store's C helpers (pagehash.c, checksum.c, fileio.c; syslib.c finds the optional
 * system libraries). _native_build.py reads this file as the cffi declarations of
 * snapfs.store._native (its '#' lines dropped) and the C files include it, so the two
 * cannot disagree.
 *
 * Errors: a function that can fail returns >= 0 or -errno; nobody reads errno. Every call
 * releases the GIL (cffi), so a long hash or checksum runs beside the other threads.
 */
#ifndef SNAPFS_STORELIB_H
#define SNAPFS_STORELIB_H
#include <stddef.h>
#include <stdint.h>

/* Page hashes: XXH3-64 from libxxhash, found at first use (by its soname, so only in the
 * system's library directories). 1 if available. */
int snapfs_xxh3_available(void);
/* out[i] = XXH3-64 of the 4 KiB page base + pages[i] * 4096, low bit forced to 1 (0 means
 * "no page"). Only once snapfs_xxh3_available() said 1. */
void snapfs_hash_pages(const uint8_t *base, const int64_t *pages, size_t n, uint64_t *out);

/* zlib-compatible CRC32 from libdeflate (carry-less multiply), found at first use. */
int snapfs_crc32_available(void);
uint32_t snapfs_crc32(uint32_t crc, const void *buf, size_t len);
/* out[i] = CRC32 of the lens[i] bytes at bufs[i], for n buffers in one call (a batch of
 * frames: one GIL release instead of one per frame). Only once snapfs_crc32_available(). */
void snapfs_crc32_many(const uint8_t *const *bufs, const int64_t *lens, size_t n, uint32_t *out);

/* fallocate(2) and sync_file_range(2): 0 or -errno. */
int snapfs_fallocate(int fd, int mode, int64_t offset, int64_t len);
int snapfs_sync_file_range(int fd, int64_t offset, int64_t len, unsigned int flags);
#endif

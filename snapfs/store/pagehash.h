/* Page hashing (pagehash.c); declared once here for the C file and for cffi's generated
 * wrapper. */
#ifndef SNAPFS_PAGEHASH_H
#define SNAPFS_PAGEHASH_H
#include <stddef.h>
#include <stdint.h>

void snapfs_hash_pages(void *xxh3, const uint8_t *base, const int64_t *pages, size_t n, uint64_t *out);
#endif

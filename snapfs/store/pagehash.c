/* XXH3-64 of many 4 KiB pages in one call, so hashing a chunk takes no GIL and no Python per
 * page (see _pagehash.py). XXH3 comes from libxxhash (syslib.c), so this file needs no
 * xxhash headers. */
#include "storelib.h"
#include "syslib.h"

int snapfs_xxh3_available(void)
{
    return snapfs_syslibs()->xxh3 != NULL;
}

void snapfs_hash_pages(const uint8_t *base, const int64_t *pages, size_t n, uint64_t *out)
{
    uint64_t (*xxh3)(const void *, size_t) = snapfs_syslibs()->xxh3;
    for (size_t i = 0; i < n; i++)
        out[i] = xxh3(base + (size_t)pages[i] * 4096, 4096) | 1; /* low bit 1: never "no page" */
}

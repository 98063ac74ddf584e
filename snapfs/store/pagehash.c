/* XXH3-64 of many 4 KiB pages in one call, so hashing a chunk takes no GIL and no Python per
 * page (see _pagehash.py). The XXH3 function comes from the caller (libxxhash, loaded there),
 * so this file needs no xxhash headers. */
#include "pagehash.h"

typedef uint64_t (*xxh3_fn)(const void *, size_t);

void snapfs_hash_pages(void *xxh3, const uint8_t *base, const int64_t *pages, size_t n, uint64_t *out)
{
    xxh3_fn hash = (xxh3_fn)xxh3;
    for (size_t i = 0; i < n; i++)
        out[i] = hash(base + (size_t)pages[i] * 4096, 4096) | 1; /* low bit 1: never "no page" */
}

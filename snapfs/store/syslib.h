/* The optional system libraries' functions the store uses, looked up once (internal to the
 * store's C code). */
#ifndef SNAPFS_SYSLIB_H
#define SNAPFS_SYSLIB_H
#include <stddef.h>
#include <stdint.h>

struct snapfs_syslibs {
    uint64_t (*xxh3)(const void *, size_t);                 /* libxxhash's XXH3_64bits */
    uint32_t (*crc32)(uint32_t, const void *, size_t);      /* libdeflate_crc32 */
};
/* The functions found (NULL where a library or symbol is missing), looked up on the first
 * call by soname: the system's library directories only. */
const struct snapfs_syslibs *snapfs_syslibs(void);
#endif

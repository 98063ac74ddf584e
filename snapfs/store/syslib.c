/* The lookup of the optional system libraries (syslib.h). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>

#include "syslib.h"

static struct snapfs_syslibs found;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void *symbol(const char *soname, const char *name)
{
    void *lib = dlopen(soname, RTLD_NOW | RTLD_LOCAL); /* kept open: the symbol stays valid */
    return lib == NULL ? NULL : dlsym(lib, name);
}

static void find(void)
{
    found.xxh3 = (uint64_t (*)(const void *, size_t))symbol("libxxhash.so.0", "XXH3_64bits");
    found.crc32 = (uint32_t (*)(uint32_t, const void *, size_t))symbol("libdeflate.so.0",
                                                                       "libdeflate_crc32");
}

const struct snapfs_syslibs *snapfs_syslibs(void)
{
    pthread_once(&once, find);
    return &found;
}

/* File syscalls the os module lacks: fallocate with a mode, sync_file_range. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>

#include "storelib.h"

int snapfs_fallocate(int fd, int mode, int64_t offset, int64_t len)
{
    return fallocate(fd, mode, offset, len) == 0 ? 0 : -errno;
}

int snapfs_sync_file_range(int fd, int64_t offset, int64_t len, unsigned int flags)
{
    return sync_file_range(fd, offset, len, flags) == 0 ? 0 : -errno;
}

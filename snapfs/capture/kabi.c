/* The kernel ABI wrappers declared in kabi.h: each returns >= 0 or -errno. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kabi.h"

#define RET(r) ((r) < 0 ? -errno : (r))

long snapfs_syscall(long nr, long a0, long a1, long a2, long a3, long a4, long a5)
{
    long r = syscall(nr, a0, a1, a2, a3, a4, a5);
    return RET(r);
}

int snapfs_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return RET(r);
}

ssize_t snapfs_read(int fd, void *buf, size_t len)
{
    ssize_t r = read(fd, buf, len);
    return RET(r);
}

ssize_t snapfs_process_vm_readv(int pid, const struct iovec *local, unsigned long nlocal,
                                const struct iovec *remote, unsigned long nremote)
{
    ssize_t r = process_vm_readv(pid, local, nlocal, remote, nremote, 0);
    return RET(r);
}

ssize_t snapfs_process_vm_writev(int pid, const struct iovec *local, unsigned long nlocal,
                                 const struct iovec *remote, unsigned long nremote)
{
    ssize_t r = process_vm_writev(pid, local, nlocal, remote, nremote, 0);
    return RET(r);
}

int snapfs_wait4(int pid, int *status, int options)
{
    int r = wait4(pid, status, options, NULL);
    return RET(r);
}

static void nothing(int sig)
{
    (void)sig;
}

int snapfs_wake_handler(int sig)
{
    struct sigaction sa = {.sa_handler = nothing, .sa_flags = 0};
    sigemptyset(&sa.sa_mask);
    return sigaction(sig, &sa, NULL) < 0 ? -errno : 0;
}

ssize_t snapfs_wait_read(int fd, int stop_fd, int64_t timeout_ns, void *buf, size_t len)
{
    struct pollfd fds[2] = {{.fd = fd, .events = POLLIN}, {.fd = stop_fd, .events = POLLIN}};
    struct timespec ts = {timeout_ns / 1000000000, timeout_ns % 1000000000};
    int ready = ppoll(fds, 2, timeout_ns < 0 ? NULL : &ts, NULL);
    if (ready < 0)
        return errno == EINTR ? 0 : -errno;
    if (ready == 0 || fds[1].revents || !fds[0].revents)
        return 0;
    ssize_t r = read(fd, buf, len);
    if (r < 0)
        return errno == EAGAIN || errno == EINTR ? 0 : -errno;
    return r;
}

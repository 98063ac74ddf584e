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
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

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

int snapfs_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t *out)
{
#if defined(__x86_64__) || defined(__i386__)
    /* A leaf above the maximum returns another leaf's data (Intel): refuse it instead. */
    if (__get_cpuid_max(leaf & 0x80000000u, NULL) < leaf)
        return -EINVAL;
    __cpuid_count(leaf, subleaf, out[0], out[1], out[2], out[3]);
    return 0;
#else
    (void)leaf, (void)subleaf, (void)out;
    return -ENOSYS;
#endif
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

/* Batched ptrace: see kabi.h. Raw syscalls, like snapfs.capture.kernel.ptrace. */
#define PTRACE_REQ(req, tid, addr, data) syscall(SYS_ptrace, (long)(req), (long)(tid), (long)(addr), (long)(data))
/* linux/ptrace.h, linux/elf.h (the installed headers may predate some) */
#define SNAPFS_PTRACE_DETACH 17
#define SNAPFS_PTRACE_GETREGSET 0x4204
#define SNAPFS_PTRACE_SEIZE 0x4206
#define SNAPFS_PTRACE_INTERRUPT 0x4207
#define SNAPFS_PTRACE_GETSIGMASK 0x420a
#define SNAPFS_PTRACE_EVENT_STOP 128

void snapfs_ptrace_seize(const int *tids, int n, long options, int *res)
{
    for (int i = 0; i < n; i++) {
        if (PTRACE_REQ(SNAPFS_PTRACE_SEIZE, tids[i], 0, options) < 0) {
            res[i] = -errno;
            continue;
        }
        res[i] = PTRACE_REQ(SNAPFS_PTRACE_INTERRUPT, tids[i], 0, 0) < 0 && errno != ESRCH ? errno : 0;
    }
}

void snapfs_ptrace_detach(const int *tids, int n, int *res)
{
    for (int i = 0; i < n; i++)
        res[i] = PTRACE_REQ(SNAPFS_PTRACE_DETACH, tids[i], 0, 0) < 0 ? -errno : 0;
}

int snapfs_wait4_many(int *tids, int *statuses, int max, int need, int options)
{
    int got = 0;
    while (got < max && got < need) {
        int status;
        int r = wait4(-1, &status, options, NULL);
        if (r < 0)
            return got ? got : -errno;
        if (r == 0)
            return got;
        tids[got] = r;
        statuses[got++] = status;
        if (!WIFSTOPPED(status) || (status >> 16) != SNAPFS_PTRACE_EVENT_STOP)
            break;
    }
    return got;
}

void snapfs_ptrace_record(const int *tids, int n, long regs_request, void *regs, size_t regs_size,
                          int *regs_res, const unsigned long *notes, int nnotes, void *sets,
                          size_t set_size, long *set_len, uint64_t *masks, int *mask_res)
{
    for (int i = 0; i < n; i++) {
        struct iovec iov;
        if (regs)
            regs_res[i] = PTRACE_REQ(regs_request, tids[i], 0, (char *)regs + (size_t)i * regs_size) < 0
                              ? -errno : 0;
        for (int j = 0; sets && j < nnotes; j++) {
            size_t at = (size_t)i * nnotes + j;
            iov.iov_base = (char *)sets + at * set_size;
            iov.iov_len = set_size;
            set_len[at] = PTRACE_REQ(SNAPFS_PTRACE_GETREGSET, tids[i], notes[j], &iov) < 0
                              ? -errno : (long)iov.iov_len;
        }
        if (masks)
            mask_res[i] = PTRACE_REQ(SNAPFS_PTRACE_GETSIGMASK, tids[i], sizeof(uint64_t), &masks[i]) < 0
                              ? -errno : 0;
    }
}

int snapfs_unprotect_units(int uffd, unsigned long wp_request, int pagemap_fd,
                           unsigned long scan_request, uint64_t *lo, uint64_t *hi, int n, int *res)
{
    enum { PAGE = 4096, HUGE_PMD = 2 << 20, PAGE_IS_HUGE = 1 << 6 };
    for (int i = 0; i < n; i++) {
        if (hi[i] <= lo[i]) {
            uint64_t addr = lo[i] & ~(uint64_t)(PAGE - 1);
            struct page_region found;
            struct pm_scan_arg arg = {
                .size = sizeof arg, .start = addr, .end = addr + PAGE,
                .vec = (uint64_t)(uintptr_t)&found, .vec_len = 1,
                .category_mask = PAGE_IS_HUGE, .return_mask = PAGE_IS_HUGE,
            };
            long got = ioctl(pagemap_fd, scan_request, &arg);
            if (got < 0)
                return -errno;
            uint64_t size = got > 0 ? HUGE_PMD : PAGE; /* a part of a THP would split it */
            lo[i] = addr / size * size;
            hi[i] = lo[i] + size;
        }
        struct uffdio_writeprotect wp = {{lo[i], hi[i] - lo[i]}, 0};
        res[i] = ioctl(uffd, wp_request, &wp) < 0 ? -errno : 0;
    }
    return 0;
}

void snapfs_writeprotect_ranges(int uffd, unsigned long wp_request, const uint64_t *lo, const uint64_t *hi,
                                int n, uint64_t mode, int *res)
{
    for (int i = 0; i < n; i++) {
        struct uffdio_writeprotect wp = {{lo[i], hi[i] - lo[i]}, mode};
        res[i] = ioctl(uffd, wp_request, &wp) < 0 ? -errno : 0;
    }
}

int snapfs_vma_page_sizes(int maps_fd, unsigned long request, const uint64_t *addrs, int n, uint64_t *sizes)
{
    for (int i = 0; i < n; i++) {
        struct procmap_query q = {0};
        q.size = sizeof q;
        q.query_addr = addrs[i];
        if (ioctl(maps_fd, request, &q) < 0) {
            if (errno != ENOENT)
                return -errno;
            sizes[i] = 0;
            continue;
        }
        sizes[i] = q.vma_page_size;
    }
    return 0;
}

void snapfs_unprotect_each(const int *fds, const uint64_t *lo, const uint64_t *hi, int n,
                           unsigned long wp_request, int *res)
{
    for (int i = 0; i < n; i++) {
        struct uffdio_writeprotect wp = {{lo[i], hi[i] - lo[i]}, 0};
        res[i] = ioctl(fds[i], wp_request, &wp) < 0 ? -errno : 0;
    }
}

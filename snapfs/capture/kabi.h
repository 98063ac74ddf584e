/*
 * The capture engine's kernel ABI, for C and for Python.
 *
 * _native_build.py reads this file as cffi declarations of snapfs.capture._native (its '#'
 * lines dropped) and the C files include it: one text, so the two cannot disagree. Structs
 * the installed headers lack (they are older than the kernel) are defined here under their
 * kernel names; nothing here includes linux/ headers. struct iovec comes from <sys/uio.h>,
 * struct user_regs from the arch module (arch_<machine>.py's REGS_STRUCT).
 *
 * Errors: every function returns a value >= 0, or -errno (the kernel's own convention).
 * Python turns that into OSError with snapfs.capture.kernel.check(); nobody reads errno.
 * Every call releases the GIL (cffi), so a call that blocks or copies runs beside Python.
 */
#ifndef SNAPFS_KABI_H
#define SNAPFS_KABI_H
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

/* userfaultfd (linux/userfaultfd.h) */
struct uffdio_api { uint64_t api; uint64_t features; uint64_t ioctls; };
struct uffdio_range { uint64_t start; uint64_t len; };
struct uffdio_register { struct uffdio_range range; uint64_t mode; uint64_t ioctls; };
struct uffdio_writeprotect { struct uffdio_range range; uint64_t mode; };
struct uffd_msg { /* the union's fields as three words (pagefault: flags, address, ptid) */
    uint8_t event; uint8_t reserved1; uint16_t reserved2; uint32_t reserved3;
    uint64_t a0; uint64_t a1; uint64_t a2;
};

/* PAGEMAP_SCAN (linux/fs.h, 6.7+) */
struct page_region { uint64_t start; uint64_t end; uint64_t categories; };
struct pm_scan_arg {
    uint64_t size; uint64_t flags; uint64_t start; uint64_t end; uint64_t walk_end;
    uint64_t vec; uint64_t vec_len; uint64_t max_pages; uint64_t category_inverted;
    uint64_t category_mask; uint64_t category_anyof_mask; uint64_t return_mask;
};

/* PROCMAP_QUERY (linux/fs.h, 6.11+): one VMA of /proc/PID/maps by address */
struct procmap_query {
    uint64_t size; uint64_t query_flags; uint64_t query_addr; uint64_t vma_start; uint64_t vma_end;
    uint64_t vma_flags; uint64_t vma_page_size; uint64_t vma_offset; uint64_t inode;
    uint32_t dev_major; uint32_t dev_minor; uint32_t vma_name_size; uint32_t build_id_size;
    uint64_t vma_name_addr; uint64_t build_id_addr;
};

/* The page size of the VMA covering each addrs[i] (PROCMAP_QUERY, request, on maps_fd, an fd
 * of /proc/PID/maps) into sizes[i], 0 where no VMA covers it (unmapped since), for i < n:
 * 0, or the first other -errno (-ENOTTY: a kernel without PROCMAP_QUERY). */
int snapfs_vma_page_sizes(int maps_fd, unsigned long request, const uint64_t *addrs, int n, uint64_t *sizes);

/* A raw syscall by number (a ptrace PEEK*, whose data may look like -errno, cannot go
 * through it). */
long snapfs_syscall(long nr, long a0, long a1, long a2, long a3, long a4, long a5);
int snapfs_ioctl(int fd, unsigned long request, void *arg);
ssize_t snapfs_read(int fd, void *buf, size_t len);
ssize_t snapfs_process_vm_readv(int pid, const struct iovec *local, unsigned long nlocal,
                                const struct iovec *remote, unsigned long nremote);
ssize_t snapfs_process_vm_writev(int pid, const struct iovec *local, unsigned long nlocal,
                                 const struct iovec *remote, unsigned long nremote);
int snapfs_wait4(int pid, int *status, int options);

/* CPUID of leaf/subleaf into out[0..3] = EAX, EBX, ECX, EDX: 0, or -EINVAL if the CPU has no
 * such leaf, -ENOSYS off x86 (the capture reads the XSAVE layout, leaf 0xD, with it). */
int snapfs_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t *out);

/* Install a handler for signal sig that does nothing, without SA_RESTART: the signal then
 * only makes a blocked system call of the thread it is sent to return EINTR (the tracer
 * thread's wait4, see snapfs.capture.ptrace). */
int snapfs_wake_handler(int sig);

/* Wait until fd or stop_fd is readable (or timeout_ns has passed; < 0: no timeout), then
 * read up to len bytes from fd (non-blocking): the bytes read; 0 after a timeout, a stop,
 * EINTR or nothing to read; or -errno. The fault thread's wait and read in one call: one
 * GIL release per batch of messages. */
ssize_t snapfs_wait_read(int fd, int stop_fd, int64_t timeout_ns, void *buf, size_t len);
/* Batched ptrace for the tracer thread (snapfs.capture.ptrace): one call, and one GIL
 * release, per stop of N threads instead of N. Every request still comes from the calling
 * thread, which must be the tracer. Results are per thread; nothing stops at a failure.
 *
 * snapfs_ptrace_seize: PTRACE_SEIZE (options) then PTRACE_INTERRUPT each of tids[0..n).
 * res[i]: 0; -errno if the seize failed (not traced); +errno if the interrupt failed with
 * anything but ESRCH (traced, not interrupted). */
void snapfs_ptrace_seize(const int *tids, int n, long options, int *res);

/* PTRACE_DETACH each of tids[0..n) (signal 0); res[i]: 0 or -errno. */
void snapfs_ptrace_detach(const int *tids, int n, int *res);

/* wait4(-1, options) until `need` events are collected (at most `max`), returning their
 * count with tids[] and statuses[] filled in order. Returns early, after the event, on any
 * event but a PTRACE_EVENT_STOP stop (an exit, exec, signal-delivery stop: the caller acts
 * on it before more waiting makes sense), when a WNOHANG wait finds nothing (0 if nothing
 * yet), or on an error once something was collected (else -errno: EINTR is how the
 * caller's deadline timer ends a blocked wait). */
int snapfs_wait4_many(int *tids, int *statuses, int max, int need, int options);

/* The state of each stopped tracee tids[i], for i < n; any output may be NULL (skipped):
 *  - regs + i*regs_size: the general registers, by regs_request (PTRACE_GETREGS: it writes
 *    regs_size bytes at its data pointer); regs_res[i]: 0 or -errno;
 *  - sets + (i*nnotes + j)*set_size: register set notes[j] (PTRACE_GETREGSET);
 *    set_len[i*nnotes + j]: bytes read or -errno;
 *  - masks[i]: the blocked-signal mask (PTRACE_GETSIGMASK); mask_res[i]: 0 or -errno. */
void snapfs_ptrace_record(const int *tids, int n, long regs_request, void *regs, size_t regs_size,
                          int *regs_res, const unsigned long *notes, int nnotes, void *sets,
                          size_t set_size, long *set_len, uint64_t *masks, int *mask_res);

/* Unprotect the unit of each write fault of a batch (pre-protection: nothing to save), for
 * i < n: lo[i]..hi[i], as given when hi[i] > lo[i] (a hugetlb page), else the 4 KiB page of
 * lo[i], or the 2 MiB THP holding it where PAGEMAP_SCAN (scan_request on pagemap_fd) finds
 * one; lo[i]/hi[i] are set to the unit. res[i]: 0 or -errno of its UFFDIO_WRITEPROTECT
 * (wp_request). Returns 0, or -errno if a PAGEMAP_SCAN failed. */
int snapfs_unprotect_units(int uffd, unsigned long wp_request, int pagemap_fd,
                           unsigned long scan_request, uint64_t *lo, uint64_t *hi, int n, int *res);

/* UFFDIO_WRITEPROTECT (wp_request) of lo[i]..hi[i] with mode for i < n, in one call: the
 * freeze re-protects thousands of scattered written ranges (a JVM-like target: 6 600), at
 * ~2 us of Python per call on top of the kernel's. res[i]: 0 or -errno. */
void snapfs_writeprotect_ranges(int uffd, unsigned long wp_request, const uint64_t *lo, const uint64_t *hi,
                                int n, uint64_t mode, int *res);

/* Unprotect lo[i]..hi[i] through uffd fds[i] (wp_request), for i < n, in one call: a shared
 * object's page saved by a fault is unprotected in every member that maps it. res[i]: 0 or
 * -errno of its UFFDIO_WRITEPROTECT. */
void snapfs_unprotect_each(const int *fds, const uint64_t *lo, const uint64_t *hi, int n,
                           unsigned long wp_request, int *res);
#endif

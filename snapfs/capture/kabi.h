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

/* Install a handler for signal sig that does nothing, without SA_RESTART: the signal then
 * only makes a blocked system call of the thread it is sent to return EINTR (the tracer
 * thread's wait4, see snapfs.capture.ptrace). */
int snapfs_wake_handler(int sig);

/* Wait until fd or stop_fd is readable (or timeout_ns has passed; < 0: no timeout), then
 * read up to len bytes from fd (non-blocking): the bytes read; 0 after a timeout, a stop,
 * EINTR or nothing to read; or -errno. The fault thread's wait and read in one call: one
 * GIL release per batch of messages. */
ssize_t snapfs_wait_read(int fd, int stop_fd, int64_t timeout_ns, void *buf, size_t len);
#endif

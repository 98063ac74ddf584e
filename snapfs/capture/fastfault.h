/* The native fault loop (fastfault.c); declared once here for the C file and for cffi's
 * generated wrapper, so a signature mismatch is a compile error. */
#ifndef SNAPFS_FASTFAULT_H
#define SNAPFS_FASTFAULT_H
#include <pthread.h>
#include <stdint.h>

int snapfs_fault_loop(int uffd, int stop_fd, int forward_fd, int notify_fd, int pid,
                      unsigned long wp_request, const uint64_t *ext_start,
                      const uint64_t *ext_end, const int64_t *ext_base, const uint8_t *ext_huge,
                      int64_t n_ext, uint8_t *state, pthread_mutex_t *lock, uint8_t *pages,
                      uint64_t *records, uint64_t capacity, uint64_t *counters);
#endif

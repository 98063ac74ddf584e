/*
 * avx512regs: holds known AVX-512 register values for the `core` view's gdb test (the XSAVE
 * area's components sit at CPU-specific offsets: AMD and Intel differ).
 *
 *   k1 = 0x5a5a, k7 = 0xc3; zmm3 qwords 0x03030303030303i0, zmm17 qwords 0x17171717171717i0
 *   (i = 0..7, the qword's index)
 *
 * Prints "ready pid=P" and then spins without touching them. Needs AVX-512F (the test skips
 * without it).
 */
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

static const uint64_t zmm3[8] = {0x0303030303030300, 0x0303030303030301, 0x0303030303030302,
                                 0x0303030303030303, 0x0303030303030304, 0x0303030303030305,
                                 0x0303030303030306, 0x0303030303030307};
static const uint64_t zmm17[8] = {0x1717171717171700, 0x1717171717171701, 0x1717171717171702,
                                  0x1717171717171703, 0x1717171717171704, 0x1717171717171705,
                                  0x1717171717171706, 0x1717171717171707};

int main(void) {
    printf("ready pid=%d\n", getpid());
    fflush(stdout);
    /* No call after the loads: a function call may clobber vector registers. */
    __asm__ volatile("vmovdqu64 %0, %%zmm3\n\t"
                     "vmovdqu64 %1, %%zmm17\n\t"
                     "mov $0x5a5a, %%eax\n\t"
                     "kmovw %%eax, %%k1\n\t"
                     "mov $0xc3, %%eax\n\t"
                     "kmovw %%eax, %%k7\n\t"
                     "1: pause\n\t"
                     "jmp 1b"
                     :
                     : "m"(zmm3), "m"(zmm17)
                     : "eax", "memory");
    return 0;
}

/*
 * nolibc: a static program without libc (built with -nostdlib -static), whose executable
 * memory has no `syscall; ret` sequence: snapfs cannot inject into it safely and must say so.
 * Prints "ready", then waits in pause() for ever.
 */
static const char msg[] = "ready\n";

void _start(void) {
    __asm__ volatile(
        "mov $1, %%eax\n mov $1, %%edi\n lea %0, %%rsi\n mov $6, %%edx\n syscall\n"
        "1: mov $34, %%eax\n syscall\n jmp 1b\n"
        :
        : "m"(msg)
        : "rax", "rdi", "rsi", "rdx", "rcx", "r11", "memory");
    __builtin_unreachable();
}

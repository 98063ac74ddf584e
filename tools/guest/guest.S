/*
 * snapfs test guest: a multiboot (v1) kernel for `qemu-system-x86_64 -kernel guest.elf`.
 *
 * It keeps writing a self-describing pattern into guest RAM so a restored memory image can be
 * checked for consistency (a snapshot torn between instants fails the check):
 *   RECORD (GPA 0x300000): "SNAPGST1", u32 counter C, u32 NPAGES, u32 AREA, u32 fill end
 *   iteration c = 1, 2, ...: page (c mod NPAGES) of AREA gets dword0 = c, dword1 = ~c,
 *   then RECORD.counter = c.
 * At boot it also fills RAM from FILL_START to 1 MiB below the end of RAM (from the multiboot
 * memory info) with dword (address ^ 0x5a5a5a5a), so snapshots carry real data pages.
 * So at any instant every page i holds the largest c <= C (or C+1 for the page written just
 * before the counter) with c = i (mod NPAGES), and pages never written are zero.
 */
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0
        .set RECORD, 0x00300000
        .set AREA, 0x00400000
        .set NPAGES, 2048               /* 8 MiB pattern area: fits a 32 MiB guest */
        .set DELAY, 300                 /* spin between writes: slows the counter's wrap */
        .set FILL_START, 0x01000000

        .section .multiboot, "a"
        .align 4
        .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

        .text
        .code32
        .globl _start
_start:
        cli
        mov $stack_top, %esp
        mov $FILL_START, %edi
        testl $1, (%ebx)                /* multiboot flags: mem_lower/mem_upper valid? */
        jz 4f
        mov 8(%ebx), %ecx               /* mem_upper: KiB above 1 MiB */
        shl $10, %ecx                   /* end of RAM - 1 MiB (keep the firmware's tables) */
3:
        cmp %ecx, %edi
        jae 4f
        mov %edi, %eax
        xor $0x5a5a5a5a, %eax
        mov %eax, (%edi)
        add $4, %edi
        jmp 3b
4:
        movl $0x50414e53, RECORD        /* "SNAP" */
        movl $0x31545347, RECORD + 4    /* "GST1" */
        movl $0, RECORD + 8
        movl $NPAGES, RECORD + 12
        movl $AREA, RECORD + 16
        mov %edi, RECORD + 20           /* where the boot-time fill ended */
1:
        mov RECORD + 8, %eax
        inc %eax
        mov %eax, %edx
        and $(NPAGES - 1), %edx
        shl $12, %edx
        add $AREA, %edx
        mov %eax, (%edx)
        mov %eax, %ebx
        not %ebx
        mov %ebx, 4(%edx)
        mov %eax, RECORD + 8
        mov $DELAY, %esi
2:
        dec %esi
        jnz 2b
        jmp 1b

        .bss
        .align 16
        .space 4096
stack_top:

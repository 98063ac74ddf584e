/*
 * snapfs bench guest: a multiboot (v1) kernel for `qemu-system-x86_64 -kernel guest.elf`.
 *
 * It fills all RAM above 4 MiB with the same content mix as tools/targets/memwriter.c (by
 * default 30% zero pages, 40% compressible hex text, 30% random; per page by a hash of its
 * address), prints "READY pages=N nonzero_pages=N counter=0xADDR" on the debug console (port
 * 0xe9), then keeps writing 8 bytes at offset 0 of random pages, keeping each page in its
 * content class, at `rate=N` page writes per second (from the kernel command line; paced by a
 * 1 kHz PIT interrupt, the vCPU halts in between; rate=0 writes as fast as it can). The 64-bit
 * write counter lives at the printed address, so the host can read the guest's write rate.
 *
 * Build: gcc -m32 -ffreestanding, ld -m elf_i386 -T guest.ld (see tools/bench/methods/qemu_bg.py).
 */
#include <stdint.h>

#define MB_MAGIC 0x1BADB002u
#define MB_FLAGS 0x00000002u /* we need the memory map fields */
#define FILL_START (4u << 20)
#define PAGE 4096u
#define ZERO_PCT 30u
#define TEXT_PCT 40u

__attribute__((section(".multiboot"), used, aligned(4)))
static const uint32_t mb_header[3] = {MB_MAGIC, MB_FLAGS, (uint32_t)-(MB_MAGIC + MB_FLAGS)};

struct mb_info {
    uint32_t flags, mem_lower, mem_upper, boot_device, cmdline;
};

volatile uint64_t guest_writes;
static volatile uint32_t ticks;
uint8_t stack[16384] __attribute__((aligned(16), used));

struct idt_entry {
    uint16_t off_lo, sel;
    uint8_t zero, type;
    uint16_t off_hi;
} __attribute__((packed));
static struct idt_entry idt[256];

void kmain(struct mb_info *mbi);
void irq0_stub(void);

__asm__(".text\n.globl _start\n_start:\n"
        "  cli\n  mov $stack+16384, %esp\n  push %ebx\n  call kmain\n"
        "1: hlt\n  jmp 1b\n"
        ".globl irq0_stub\nirq0_stub:\n"
        "  push %eax\n  incl ticks\n  mov $0x20, %al\n  out %al, $0x20\n  pop %eax\n  iret\n"
        ".globl ignore_stub\nignore_stub:\n  iret\n");
void ignore_stub(void);

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }

static void puts_dbg(const char *s)
{
    while (*s)
        outb(0xe9, (uint8_t)*s++);
}

static void put_num(uint32_t v, int hex)
{
    char buf[16];
    int i = 15;
    buf[i] = 0;
    do {
        uint32_t d = hex ? v & 15 : v % 10;
        buf[--i] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v = hex ? v >> 4 : v / 10;
    } while (v);
    puts_dbg(buf + i);
}

static inline uint32_t hash32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

static inline uint32_t xorshift32(uint32_t *s)
{
    uint32_t x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *s = x;
}

static inline unsigned page_class(uint32_t pfn)
{
    uint32_t v = hash32(pfn) % 100u;
    return v < ZERO_PCT ? 0 : v < ZERO_PCT + TEXT_PCT ? 1 : 2;
}

static const char HEX[16] = "0123456789abcdef";

static inline uint32_t hex4(uint32_t r)
{
    return (uint32_t)HEX[r & 15] | (uint32_t)HEX[(r >> 4) & 15] << 8 |
           (uint32_t)HEX[(r >> 8) & 15] << 16 | (uint32_t)HEX[(r >> 12) & 15] << 24;
}

static void fill_page(uint32_t *w, unsigned k, uint32_t *rng)
{
    if (k == 0) {
        for (unsigned i = 0; i < PAGE / 4; i++)
            w[i] = 0;
    } else if (k == 1) { /* 64-byte lines of hex; odd lines repeat the previous one */
        for (unsigned line = 0; line < PAGE / 64; line++) {
            uint32_t *l = w + line * 16;
            for (unsigned i = 0; i < 16; i++)
                l[i] = (line & 1) ? l[i - 16] : hex4(xorshift32(rng));
            if (line & 1)
                ((uint8_t *)l)[0] = (uint8_t)HEX[line & 15];
        }
    } else {
        for (unsigned i = 0; i < PAGE / 4; i++)
            w[i] = xorshift32(rng);
    }
}

static uint32_t parse_rate(const char *cmd)
{
    for (const char *p = cmd; p && *p; p++) {
        if (p[0] == 'r' && p[1] == 'a' && p[2] == 't' && p[3] == 'e' && p[4] == '=') {
            uint32_t v = 0;
            for (p += 5; *p >= '0' && *p <= '9'; p++)
                v = v * 10 + (uint32_t)(*p - '0');
            return v;
        }
    }
    return 0;
}

static void set_gate(int vec, void (*fn)(void), uint16_t cs)
{
    uint32_t a = (uint32_t)fn;
    idt[vec] = (struct idt_entry){(uint16_t)a, cs, 0, 0x8E, (uint16_t)(a >> 16)};
}

static void start_timer(void)
{
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    for (int i = 0; i < 256; i++)
        set_gate(i, ignore_stub, cs);
    set_gate(32, irq0_stub, cs);
    struct {
        uint16_t limit;
        uint32_t base;
    } __attribute__((packed)) idtr = {sizeof(idt) - 1, (uint32_t)idt};
    __asm__ volatile("lidt %0" ::"m"(idtr));
    /* PIC: IRQ 0-7 -> vectors 32-39, only IRQ0 unmasked */
    outb(0x20, 0x11); outb(0xA0, 0x11);
    outb(0x21, 0x20); outb(0xA1, 0x28);
    outb(0x21, 4);    outb(0xA1, 2);
    outb(0x21, 1);    outb(0xA1, 1);
    outb(0x21, 0xFE); outb(0xA1, 0xFF);
    /* PIT channel 0, rate generator, 1 kHz */
    outb(0x43, 0x34);
    outb(0x40, 1193 & 0xFF);
    outb(0x40, 1193 >> 8);
    __asm__ volatile("sti");
}

static inline void write_one(uint32_t first_pfn, uint32_t npages, uint32_t *rng)
{
    uint32_t r = xorshift32(rng);
    uint32_t pfn = first_pfn + (uint32_t)(((uint64_t)r * npages) >> 32);
    unsigned k = page_class(pfn);
    volatile uint32_t *w = (volatile uint32_t *)(pfn * PAGE);
    uint32_t r2 = xorshift32(rng);
    w[0] = k == 0 ? 0 : k == 1 ? hex4(r) : r;
    w[1] = k == 0 ? 0 : k == 1 ? hex4(r2) : r2;
    guest_writes++;
}

void kmain(struct mb_info *mbi)
{
    uint32_t end = (mbi->flags & 1) ? (1u << 20) + mbi->mem_upper * 1024u : (32u << 20);
    uint32_t rate = (mbi->flags & 4) ? parse_rate((const char *)mbi->cmdline) : 0;
    uint32_t first = FILL_START / PAGE, npages = (end - FILL_START) / PAGE, nonzero = 0;
    uint32_t rng = 0x12345678u;
    for (uint32_t i = 0; i < npages; i++) {
        unsigned k = page_class(first + i);
        nonzero += k != 0;
        fill_page((uint32_t *)((first + i) * PAGE), k, &rng);
    }
    puts_dbg("READY pages=");
    put_num(npages, 0);
    puts_dbg(" nonzero_pages=");
    put_num(nonzero, 0);
    puts_dbg(" counter=0x");
    put_num((uint32_t)&guest_writes, 1);
    puts_dbg(" rate=");
    put_num(rate, 0);
    puts_dbg("\n");
    if (rate == 0) {
        for (;;)
            write_one(first, npages, &rng);
    }
    start_timer();
    uint32_t seen = 0, acc = 0; /* acc: page writes owed, in thousandths */
    for (;;) {
        __asm__ volatile("hlt");
        uint32_t now = ticks;
        for (; seen != now; seen++)
            acc += rate;
        for (; acc >= 1000u; acc -= 1000u)
            write_one(first, npages, &rng);
    }
}

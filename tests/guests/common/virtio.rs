//! A minimal virtio-mmio driver core (virtio 1.2, sections 2 and 4.2): finding the devices the
//! command line announces, modern (version 2) probing, feature negotiation, and split virtqueues
//! in guest memory that the driver polls (no interrupts).
//!
//! Every register access is a volatile 32-bit MMIO access, so each one is a VM exit the VMM
//! serves; QueueNotify writes are what KVM turns into ioeventfd signals. The guest is single
//! threaded and x86 keeps stores in order, so compiler fences are the only barriers needed.

use core::cell::UnsafeCell;
use core::sync::atomic::{compiler_fence, AtomicUsize, Ordering};

use super::boot_info::{parse_number, BootInfo};
use super::{rdtsc, read_phys, write_phys};

/// Device ids (virtio 1.2, section 5).
pub mod id {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Socket device.
    pub const VSOCK: u32 = 19;
}

/// VIRTIO_F_VERSION_1: the device follows virtio 1.x (the only kind this driver handles).
pub const F_VERSION_1: u64 = 1 << 32;

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Avail ring flag: the driver polls, the device need not interrupt.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// TSC ticks in roughly one second (the guests have no calibrated clock; timeouts are loose).
pub const SECOND: u64 = 3_000_000_000;

/// The most devices read from the command line.
pub const MAX_DEVICES: usize = 16;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC: u64 = 0x080;
const REG_QUEUE_AVAIL: u64 = 0x090;
const REG_QUEUE_USED: u64 = 0x0a0;
const REG_CONFIG: u64 = 0x100;

const MAGIC: u32 = 0x7472_6976;

/// Device status bits.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation finished.
    pub const FEATURES_OK: u32 = 8;
    /// The device gave up.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
}

// ---------------------------------------------------------------------------------------------
// Memory the devices read and write.

const ARENA_SIZE: usize = 256 * 1024;

/// Guest memory handed to devices: rings and buffers. Lives in .bss (zeroed at entry).
#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; ARENA_SIZE]>);

// SAFETY: only the boot processor runs guest code that touches the arena; bytes are handed out
// once each by `dma_alloc`, never twice.
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(UnsafeCell::new([0; ARENA_SIZE]));
static ARENA_USED: AtomicUsize = AtomicUsize::new(0);

/// Hands out `size` zeroed bytes aligned to `align` (a power of two) of identity-mapped memory
/// for device access, as a guest-physical address. Never freed.
pub fn dma_alloc(size: usize, align: usize) -> u64 {
    let base = ARENA.0.get() as usize;
    let used = ARENA_USED.load(Ordering::Relaxed);
    let start = (base + used + align - 1) & !(align - 1);
    let end = start + size;
    if end > base + ARENA_SIZE {
        super::fail("virtio: DMA arena exhausted");
    }
    ARENA_USED.store(end - base, Ordering::Relaxed);
    start as u64
}

/// Fills `len` bytes at `paddr` from `src` (volatile, the device may look).
pub fn copy_to(paddr: u64, src: &[u8]) {
    for (i, &b) in src.iter().enumerate() {
        // SAFETY: callers pass arena buffers at least `src.len()` bytes long.
        unsafe { write_phys(paddr + i as u64, b) };
    }
}

/// Reads `dst.len()` bytes at `paddr` (volatile, the device wrote them).
pub fn copy_from(paddr: u64, dst: &mut [u8]) {
    for (i, b) in dst.iter_mut().enumerate() {
        // SAFETY: callers pass arena buffers at least `dst.len()` bytes long.
        *b = unsafe { read_phys(paddr + i as u64) };
    }
}

/// How a driver spreads a request over descriptors (`mvm_layout=plain|split|merged`). Virtio 1
/// devices must accept any layout (VIRTIO_F_ANY_LAYOUT is implied by VERSION_1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One descriptor per part (header, data, status).
    Plain,
    /// Parts cut into several descriptors (headers split, data in 512-byte pieces).
    Split,
    /// Neighbouring parts of the same direction share one descriptor.
    Merged,
}

impl Layout {
    /// The layout the command line asks for (`plain` when absent or unknown).
    pub fn from_cmdline(boot: &BootInfo) -> Layout {
        match boot.arg("mvm_layout") {
            Some(b"split") => Layout::Split,
            Some(b"merged") => Layout::Merged,
            _ => Layout::Plain,
        }
    }

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Plain => "plain",
            Layout::Split => "split",
            Layout::Merged => "merged",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Finding devices.

/// One `virtio_mmio.device=SIZE@BASE:IRQ` announcement.
#[derive(Debug, Clone, Copy, Default)]
pub struct Slot {
    /// Window size in bytes.
    pub size: u64,
    /// Window base, guest-physical.
    pub base: u64,
    /// Interrupt line.
    pub irq: u64,
}

/// Parses `SIZE[K|M|G]@BASE:IRQ`.
pub fn parse_slot(text: &[u8]) -> Option<Slot> {
    let at = text.iter().position(|&b| b == b'@')?;
    let (size, rest) = (&text[..at], &text[at + 1..]);
    let colon = rest.iter().position(|&b| b == b':')?;
    let (base, irq) = (&rest[..colon], &rest[colon + 1..]);
    let (digits, shift) = match size.last()? {
        b'K' | b'k' => (&size[..size.len() - 1], 10),
        b'M' | b'm' => (&size[..size.len() - 1], 20),
        b'G' | b'g' => (&size[..size.len() - 1], 30),
        _ => (size, 0),
    };
    Some(Slot {
        size: parse_number(digits)? << shift,
        base: parse_number(base)?,
        irq: parse_number(irq)?,
    })
}

/// The devices announced on the command line, in order.
#[derive(Debug)]
pub struct Slots {
    slots: [Slot; MAX_DEVICES],
    count: usize,
}

impl Slots {
    /// Reads every `virtio_mmio.device=` argument; malformed ones are reported and skipped.
    pub fn from_cmdline(boot: &BootInfo) -> Slots {
        let mut s = Slots {
            slots: [Slot::default(); MAX_DEVICES],
            count: 0,
        };
        for arg in boot.args("virtio_mmio.device") {
            match parse_slot(arg) {
                Some(slot) if s.count < MAX_DEVICES => {
                    s.slots[s.count] = slot;
                    s.count += 1;
                }
                Some(_) => super::out::line().s("error too many virtio devices").end(),
                None => super::out::line()
                    .s("error bad virtio_mmio.device=")
                    .bytes(arg)
                    .end(),
            }
        }
        s
    }

    /// The slots.
    pub fn all(&self) -> &[Slot] {
        &self.slots[..self.count]
    }

    /// Transports of the devices with device id `want`, in command-line order.
    pub fn with_id(&self, want: u32) -> impl Iterator<Item = Transport> + '_ {
        self.all().iter().filter_map(move |slot| {
            let t = Transport::probe(slot.base).ok()?;
            (t.device_id() == want).then_some(t)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The register interface.

/// One virtio-mmio device window.
#[derive(Debug)]
pub struct Transport {
    base: u64,
}

impl Transport {
    fn read(&self, reg: u64) -> u32 {
        // SAFETY: `base` is a virtio-mmio window (probed), mapped uncached by entry.S; reading a
        // register has no effect beyond returning its value.
        unsafe { read_phys(self.base + reg) }
    }

    fn write(&self, reg: u64, value: u32) {
        // SAFETY: as for `read`; the register writes used here follow the virtio-mmio protocol.
        unsafe { write_phys(self.base + reg, value) }
    }

    /// Checks the magic value and the modern layout (version 2).
    pub fn probe(base: u64) -> Result<Transport, &'static str> {
        if !(0xc000_0000..0x1_0000_0000).contains(&base) {
            return Err("virtio-mmio window outside the uncached 3-4 GiB range");
        }
        let t = Transport { base };
        if t.read(REG_MAGIC) != MAGIC {
            return Err("no virtio-mmio magic");
        }
        if t.read(REG_VERSION) != 2 {
            return Err("virtio-mmio version is not 2 (legacy)");
        }
        Ok(t)
    }

    /// The window's base address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The device id (0: no device behind the window).
    pub fn device_id(&self) -> u32 {
        self.read(REG_DEVICE_ID)
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.read(REG_STATUS)
    }

    fn device_features(&self) -> u64 {
        self.write(REG_DEVICE_FEATURES_SEL, 0);
        let low = self.read(REG_DEVICE_FEATURES);
        self.write(REG_DEVICE_FEATURES_SEL, 1);
        let high = self.read(REG_DEVICE_FEATURES);
        (u64::from(high) << 32) | u64::from(low)
    }

    /// Resets the device and negotiates: accepts VERSION_1 and those of `wanted` the device
    /// offers. Returns (offered, accepted).
    pub fn negotiate(&self, wanted: u64) -> Result<(u64, u64), &'static str> {
        self.write(REG_STATUS, 0);
        if self.status() != 0 {
            return Err("device did not reset");
        }
        self.write(REG_STATUS, status::ACKNOWLEDGE);
        self.write(REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let offered = self.device_features();
        if offered & F_VERSION_1 == 0 {
            return Err("device does not offer VERSION_1");
        }
        let accepted = offered & (wanted | F_VERSION_1);
        self.write(REG_DRIVER_FEATURES_SEL, 0);
        self.write(REG_DRIVER_FEATURES, accepted as u32);
        self.write(REG_DRIVER_FEATURES_SEL, 1);
        self.write(REG_DRIVER_FEATURES, (accepted >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write(REG_STATUS, s);
        if self.status() & status::FEATURES_OK == 0 {
            return Err("device refused the features (FEATURES_OK not kept)");
        }
        Ok((offered, accepted))
    }

    /// Sets up queue `index` with at most `size` entries (a power of two) in fresh arena memory.
    pub fn queue(&self, index: u16, size: u16) -> Result<Virtqueue, &'static str> {
        self.write(REG_QUEUE_SEL, u32::from(index));
        if self.read(REG_QUEUE_READY) != 0 {
            return Err("queue already in use");
        }
        let max = self.read(REG_QUEUE_NUM_MAX);
        if max == 0 {
            return Err("queue not available");
        }
        let size = u32::from(size).min(max) as u16;
        let n = usize::from(size);
        let desc = dma_alloc(16 * n, 16);
        let avail = dma_alloc(6 + 2 * n, 2);
        let used = dma_alloc(6 + 8 * n, 4);
        // SAFETY: `avail` was just handed out by the arena and is 6 + 2n bytes long.
        unsafe { write_phys(avail, AVAIL_F_NO_INTERRUPT) };
        self.write(REG_QUEUE_NUM, u32::from(size));
        for (reg, addr) in [
            (REG_QUEUE_DESC, desc),
            (REG_QUEUE_AVAIL, avail),
            (REG_QUEUE_USED, used),
        ] {
            self.write(reg, addr as u32);
            self.write(reg + 4, (addr >> 32) as u32);
        }
        self.write(REG_QUEUE_READY, 1);
        if self.read(REG_QUEUE_READY) != 1 {
            return Err("queue did not become ready");
        }
        Ok(Virtqueue {
            notify: self.base + REG_QUEUE_NOTIFY,
            index,
            size,
            desc,
            avail,
            used,
            next_avail: 0,
            last_used: 0,
        })
    }

    /// Sets DRIVER_OK; fails if the device then asks for a reset (it refused the queues).
    pub fn driver_ok(&self) -> Result<(), &'static str> {
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        self.write(REG_STATUS, s);
        let now = self.status();
        if now & status::DEVICE_NEEDS_RESET != 0 {
            return Err("device needs reset after DRIVER_OK (queues refused)");
        }
        if now & status::DRIVER_OK == 0 {
            return Err("DRIVER_OK not kept");
        }
        Ok(())
    }

    /// Reads a 32-bit little-endian field of the configuration space.
    pub fn config_u32(&self, offset: u64) -> u32 {
        self.read(REG_CONFIG + offset)
    }

    /// Reads one byte of the configuration space.
    pub fn config_u8(&self, offset: u64) -> u8 {
        // SAFETY: as for `read`; configuration space reads have no side effects.
        unsafe { read_phys(self.base + REG_CONFIG + offset) }
    }

    /// Reads a 64-bit field of the configuration space as two 32-bit halves.
    pub fn config_u64(&self, offset: u64) -> u64 {
        u64::from(self.config_u32(offset)) | (u64::from(self.config_u32(offset + 4)) << 32)
    }
}

// ---------------------------------------------------------------------------------------------
// Split virtqueues.

/// One buffer of a descriptor chain.
#[derive(Debug, Clone, Copy)]
pub struct Buffer {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (otherwise it reads it).
    pub writable: bool,
}

/// One used ring entry: which chain came back, and how many bytes the device wrote.
#[derive(Debug, Clone, Copy)]
pub struct Used {
    /// Head descriptor index.
    pub id: u32,
    /// Bytes written into the chain's writable buffers.
    pub len: u32,
}

/// A split virtqueue the driver polls.
#[derive(Debug)]
pub struct Virtqueue {
    notify: u64,
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    last_used: u16,
}

impl Virtqueue {
    /// Number of descriptors.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Writes descriptor `i`.
    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + 16 * u64::from(i % self.size);
        // SAFETY: the descriptor table holds `size` 16-byte entries; `i % size` is one of them.
        unsafe {
            write_phys(d, addr);
            write_phys(d + 8, len);
            write_phys(d + 12, flags);
            write_phys(d + 14, next);
        }
    }

    /// Writes `bufs` as one chain into descriptors `first..first + bufs.len()`.
    pub fn set_chain(&mut self, first: u16, bufs: &[Buffer]) {
        for (k, b) in bufs.iter().enumerate() {
            let i = first + k as u16;
            let mut flags = if b.writable { DESC_F_WRITE } else { 0 };
            if k + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            self.set_desc(i, b.addr, b.len, flags, i + 1);
        }
    }

    /// Offers the chain starting at `head` to the device (without notifying it).
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.next_avail % self.size);
        compiler_fence(Ordering::SeqCst);
        // SAFETY: the avail ring holds `size` entries after its 4-byte header.
        unsafe { write_phys(slot, head) };
        compiler_fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        // SAFETY: the avail ring's idx field.
        unsafe { write_phys(self.avail + 2, self.next_avail) };
        compiler_fence(Ordering::SeqCst);
    }

    /// Tells the device the queue has new buffers (QueueNotify: the KVM MMIO exit).
    pub fn notify(&self) {
        compiler_fence(Ordering::SeqCst);
        // SAFETY: QueueNotify of this queue's device window; the value is the queue index.
        unsafe { write_phys(self.notify, u32::from(self.index)) };
    }

    /// The next used entry, if the device returned one.
    pub fn poll(&mut self) -> Option<Used> {
        // SAFETY: the used ring's idx field, written by the device.
        let idx: u16 = unsafe { read_phys(self.used + 2) };
        if idx == self.last_used {
            return None;
        }
        compiler_fence(Ordering::SeqCst);
        let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        // SAFETY: one of the `size` 8-byte used elements after the 4-byte header.
        let (id, len) = unsafe { (read_phys(e), read_phys(e + 4)) };
        self.last_used = self.last_used.wrapping_add(1);
        Some(Used { id, len })
    }

    /// Polls for a used entry for at most `timeout` TSC ticks.
    pub fn wait(&mut self, timeout: u64) -> Option<Used> {
        let start = rdtsc();
        loop {
            if let Some(u) = self.poll() {
                return Some(u);
            }
            if rdtsc().wrapping_sub(start) > timeout {
                return None;
            }
            core::hint::spin_loop();
        }
    }

    /// Sends one request: `bufs` as a chain in descriptors 0.., notify, wait for it to come
    /// back. Only for queues that carry one request at a time. Returns the used length.
    pub fn request(&mut self, bufs: &[Buffer], timeout: u64) -> Option<u32> {
        self.set_chain(0, bufs);
        self.publish(0);
        self.notify();
        let used = self.wait(timeout)?;
        (used.id == 0).then_some(used.len)
    }
}

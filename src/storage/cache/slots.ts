// Slot allocation of one cache level: the line-sized slots of the `cache` extents the
// level holds on its medium, and the draining of extents the partition table takes back.
//
//   extent e:  [slot][slot][slot][slot]...   (extentSize / LINE_SIZE slots)
//   state of a slot:  free (on the free list) | taken (by a caller, until give())
//                     | parked (given back while pinned, until the last pin's release)
//   state of an extent: active | draining (none of its slots is handed out again)
//
// A slot is taken before any I/O touches it and given back after the last; the cache
// holds a taken slot either as a line's home or briefly between its taker and the line
// (admission, demotion, promotion). So `used[e] == 0` means no line lives in extent e,
// no slot of it is between a taker and a line, and no I/O is in flight on it.
//
// A pin is a reader outside the cache holding a taken slot's memory (an NBD reply that
// the socket sends from the line's own bytes, not a copy): the slot may be given back
// meanwhile, but it is not handed out again, so no other line's bytes ever reach that
// memory while a pin holds it. A parked slot counts as neither free nor taken: a drain
// does not wait for it, since the cache hands an extent over only after zeroing it, and
// zeroing a whole DRAM extent replaces its memory instead of writing it (the pinned
// reader keeps the old bytes; dram-medium.ts). Pins of extents removed are void.
//
// Invariants (test/unit/storage/cache/slots.test.ts):
//   - take() never returns a slot of a draining extent, nor a slot already taken, nor a
//     slot a live pin holds;
//   - drain(E) resolves only once no slot of any extent in E is taken, and from then
//     until remove(E) or undrain(E) none of them can be taken;
//   - free + taken + parked = slots of the extents held, at every step (the free slots
//     of draining extents off the free list).

import type { MediumName } from '../../kinds.js';
import { LINE_SIZE } from './line.js';

/** A reader's hold on a slot's memory (see pin). */
export interface SlotPin {
  readonly slot: number;
  /** The extent's removals when pinned: a pin from before the last one is void. */
  readonly removals: number;
}

export class SlotPool<L> {
  readonly medium: MediumName;
  private readonly extentSize: number;
  private readonly perExtent: number;
  private readonly free: number[];
  /** Taken slots per extent held. */
  private readonly used: Map<number, number>;
  private readonly draining: Set<number>;
  private readonly taken: Set<number>;
  /** The line living in each taken slot that has one (the slot's home). */
  private readonly homes: Map<number, L>;
  /** Live pins per slot. */
  private readonly pins: Map<number, number>;
  /** Slots given back while pinned: off the free list until their last pin goes. */
  private readonly parked: Set<number>;
  /** Times each extent was removed (see SlotPin.removals). */
  private readonly removals: Map<number, number>;
  private waiters: (() => void)[];

  constructor(medium: MediumName, extentSize: number) {
    this.medium = medium;
    this.extentSize = extentSize;
    this.perExtent = Math.floor(extentSize / LINE_SIZE);
    this.free = [];
    this.used = new Map();
    this.draining = new Set();
    this.taken = new Set();
    this.homes = new Map();
    this.pins = new Map();
    this.parked = new Set();
    this.removals = new Map();
    this.waiters = [];
  }

  /** Slots of the extents held, draining ones included. */
  get slots(): number {
    return this.used.size * this.perExtent;
  }

  /** Slots of extents that are not draining: what the level can still hand out. */
  get activeSlots(): number {
    return (this.used.size - this.draining.size) * this.perExtent;
  }

  /** Slots that can be taken now. */
  get freeSlots(): number {
    return this.free.length;
  }

  /** Slots a live pin holds (taken or parked). */
  get pinnedSlots(): number {
    return this.pins.size;
  }

  /** Taken slots that are no line's home yet: between their taker and a line. */
  get homeless(): number {
    return this.taken.size - this.homes.size;
  }

  /** Extents held, in ascending order. */
  extents(): number[] {
    return [...this.used.keys()].sort((a, b) => a - b);
  }

  /** Adds extents newly assigned to the cache; their slots become free. */
  add(extents: readonly number[]): number {
    for (const e of extents) {
      if (this.used.has(e)) continue;
      this.used.set(e, 0);
      for (let k = this.perExtent - 1; k >= 0; k--) this.free.push(e * this.extentSize + k * LINE_SIZE);
    }
    this.wake();
    return extents.length * this.perExtent;
  }

  /** A free slot, or undefined when there is none. */
  take(): number | undefined {
    const slot = this.free.pop();
    if (slot === undefined) return undefined;
    const e = this.extentOf(slot);
    this.used.set(e, (this.used.get(e) ?? 0) + 1);
    this.taken.add(slot);
    return slot;
  }

  /** Records the line that lives in a taken slot. */
  home(slot: number, line: L): void {
    this.homes.set(slot, line);
    this.wake();
  }

  /**
   * Gives a taken slot back; a slot of a draining extent is not handed out again, nor a
   * pinned one until its last pin is released.
   */
  give(slot: number): void {
    if (!this.taken.delete(slot)) throw new Error(`cache slot ${slot} on ${this.medium} was given back but not taken`);
    this.homes.delete(slot);
    const e = this.extentOf(slot);
    const used = this.used.get(e) ?? 0;
    this.used.set(e, used - 1);
    if (this.pins.has(slot)) this.parked.add(slot);
    else if (!this.draining.has(e)) this.free.push(slot);
    this.wake();
  }

  /**
   * Holds a taken slot's memory for a reader outside the cache until `release`: given
   * back meanwhile, the slot is parked instead of freed.
   */
  pin(slot: number): SlotPin {
    if (!this.taken.has(slot)) throw new Error(`cache slot ${slot} on ${this.medium} was pinned but not taken`);
    this.pins.set(slot, (this.pins.get(slot) ?? 0) + 1);
    return { slot, removals: this.removals.get(this.extentOf(slot)) ?? 0 };
  }

  /** Ends a pin; a parked slot whose last pin this was is free again. Once per pin. */
  release(pin: SlotPin): void {
    const { slot } = pin;
    const e = this.extentOf(slot);
    if ((this.removals.get(e) ?? 0) !== pin.removals) return; // its extent left the pool since
    const left = (this.pins.get(slot) ?? 0) - 1;
    if (left > 0) {
      this.pins.set(slot, left);
      return;
    }
    this.pins.delete(slot);
    if (!this.parked.delete(slot)) return;
    if (!this.draining.has(e)) this.free.push(slot);
    this.wake();
  }

  /** Resolves at the next give() or add(): a slot may be free, or a drain may be over. */
  changed(): Promise<void> {
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  /**
   * Picks up to `count` extents to give back: those with the fewest taken slots that no
   * pin holds first, then the highest. A pinned slot counts as free here: giving its
   * extent back costs its reader nothing (the extent's memory is replaced, not written)
   * and voids the pin, whereas keeping it would leave the pins to a smaller level, of
   * which they could then hold more than the quarter readViews allows, or all of it.
   */
  pick(count: number): number[] {
    const pinnedIn = new Map<number, number>();
    for (const slot of this.pins.keys()) {
      if (!this.taken.has(slot)) continue; // parked: not counted as used anyway
      const e = this.extentOf(slot);
      pinnedIn.set(e, (pinnedIn.get(e) ?? 0) + 1);
    }
    return [...this.used.entries()]
      .filter(([e]) => !this.draining.has(e))
      .map(([e, used]) => [e, used - (pinnedIn.get(e) ?? 0)] as const)
      .sort((a, b) => a[1] - b[1] || b[0] - a[0])
      .slice(0, count)
      .map(([e]) => e);
  }

  /** Stops handing out slots of `extents`; their free slots leave the free list. */
  startDrain(extents: readonly number[]): void {
    for (const e of extents) this.draining.add(e);
    const keep = this.free.filter((slot) => !this.draining.has(this.extentOf(slot)));
    this.free.length = 0;
    this.free.push(...keep);
    this.wake();
  }

  /** Lines living in the draining extents now. */
  linesIn(extents: readonly number[]): L[] {
    const wanted = new Set(extents);
    const lines: L[] = [];
    for (const [slot, line] of this.homes) if (wanted.has(this.extentOf(slot))) lines.push(line);
    return lines;
  }

  /** True once no slot of `extents` is taken. */
  drained(extents: readonly number[]): boolean {
    return extents.every((e) => (this.used.get(e) ?? 0) === 0);
  }

  /** A drain that could not finish: the extents' free slots are handed out again. */
  undrain(extents: readonly number[]): void {
    for (const e of extents) {
      if (!this.draining.delete(e)) continue;
      // Slots of e are free unless taken; taken ones come back through give().
      for (let k = this.perExtent - 1; k >= 0; k--) {
        const slot = e * this.extentSize + k * LINE_SIZE;
        if (!this.taken.has(slot) && !this.parked.has(slot)) this.free.push(slot);
      }
    }
    this.wake();
  }

  /** Forgets drained extents: they are no longer the cache's. */
  remove(extents: readonly number[]): void {
    for (const e of extents) {
      if ((this.used.get(e) ?? 0) !== 0) throw new Error(`cache extent ${e} on ${this.medium} still has slots in use`);
      this.draining.delete(e);
      this.used.delete(e);
      // Its pins are void: their readers hold the extent's old memory, which the cache
      // replaced when it zeroed the extent, and a slot of it added back later is new.
      this.removals.set(e, (this.removals.get(e) ?? 0) + 1);
      for (let k = 0; k < this.perExtent; k++) {
        const slot = e * this.extentSize + k * LINE_SIZE;
        this.parked.delete(slot);
        this.pins.delete(slot);
      }
    }
    const keep = this.free.filter((slot) => this.used.has(this.extentOf(slot)));
    this.free.length = 0;
    this.free.push(...keep);
    // Whoever waits for a slot must look again: the level may have none left at all.
    this.wake();
  }

  extentOf(slot: number): number {
    return Math.floor(slot / this.extentSize);
  }

  private wake(): void {
    const waiters = this.waiters;
    if (waiters.length === 0) return;
    this.waiters = [];
    for (const w of waiters) w();
  }
}

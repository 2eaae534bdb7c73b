// A VolumeStore in memory, for tests that need many fresh volumes fast (interleaving
// runs). It keeps the contract of src/storage/volume-store.ts: ranges checked, nothing
// grows but resize, a failed sync fences. Calls pass through a FaultPlan (ops
// `mem.read`, `mem.write`, `mem.zero`, `mem.sync`) so they can fail or wait.

import { MisuseError, StorageError } from '../../src/errors.js';
import type { Extent } from '../../src/protocol/nbd/codec.js';
import type { VolumeStore } from '../../src/storage/volume-store.js';
import { errnoError, type FaultPlan } from './faults.js';

export class MemoryStore implements VolumeStore {
  private data: Buffer;
  private fenced: Error | undefined;
  private readonly plan: FaultPlan | undefined;

  constructor(size: number, plan?: FaultPlan) {
    this.data = Buffer.alloc(size);
    this.fenced = undefined;
    this.plan = plan;
  }

  get size(): number {
    return this.data.length;
  }

  get failure(): Error | undefined {
    return this.fenced;
  }

  async read(offset: number, target: Buffer): Promise<void> {
    this.check(offset, target.length);
    await this.enter('read');
    this.data.copy(target, 0, offset, offset + target.length);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.check(offset, data.length);
    this.writable();
    await this.enter('write');
    data.copy(this.data, offset);
  }

  async zeroRange(offset: number, length: number): Promise<void> {
    this.check(offset, length);
    this.writable();
    await this.enter('zero');
    this.data.fill(0, offset, offset + length);
  }

  blockStatus(_offset: number, length: number): Extent[] {
    return [{ length, flags: 0 }];
  }

  async sync(): Promise<void> {
    this.writable();
    try {
      await this.enter('sync');
    } catch (error) {
      this.fenced = error as Error;
      throw new StorageError('MS_VOLUME_FENCED', 'memory store fenced by a failed sync', { cause: error });
    }
  }

  async resize(size: number): Promise<void> {
    this.writable();
    const next = Buffer.alloc(size);
    this.data.copy(next, 0, 0, Math.min(size, this.data.length));
    this.data = next;
    return Promise.resolve();
  }

  close(): Promise<void> {
    return Promise.resolve();
  }

  destroy(): Promise<void> {
    return Promise.resolve();
  }

  private async enter(op: string): Promise<void> {
    if (this.plan === undefined) return;
    const fault = await this.plan.enter(`mem.${op}`);
    if (fault !== undefined) throw errnoError(fault === 'ENOSPC' ? 'ENOSPC' : 'EIO', op);
  }

  private check(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > this.data.length) {
      throw new MisuseError('MS_VOLUME_RANGE', `offset ${offset} length ${length} lies outside the store (${this.data.length} bytes)`);
    }
  }

  private writable(): void {
    if (this.fenced !== undefined) throw new StorageError('MS_VOLUME_FENCED', 'memory store fenced by a failed sync', { cause: this.fenced });
  }
}

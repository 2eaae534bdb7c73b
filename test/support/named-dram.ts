// DRAM media for cache tests that stand in for any medium: NamedDram answers to the
// name it is given (a 'flash' level in memory), GatedDram also waits for a gate (a
// fast-check scheduler) before each asynchronous call; readSync stays synchronous.

import { DramMedium } from '../../src/memory/dram-medium.js';
import type { MediumName } from '../../src/kinds.js';

export class NamedDram extends DramMedium {
  override readonly name: MediumName;
  constructor(name: MediumName, capacity: number, extentSize: number) {
    super({ capacity, extentSize });
    this.name = name;
  }
}

export class GatedDram extends NamedDram {
  gate: ((op: string) => Promise<void>) | undefined = undefined;

  override async read(offset: number, target: Uint8Array): Promise<void> {
    await this.gate?.(`${this.name}.read`);
    return super.read(offset, target);
  }

  override async write(offset: number, source: Uint8Array): Promise<void> {
    await this.gate?.(`${this.name}.write`);
    return super.write(offset, source);
  }

  override async zero(offset: number, length: number): Promise<void> {
    await this.gate?.(`${this.name}.zero`);
    return super.zero(offset, length);
  }
}

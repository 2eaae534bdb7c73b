// Aligned plain-text tables for the CLI, in the spirit of the patent's figures:
//
//   MEDIUM  PHYSICAL ADDRESS            SIZE    KIND    OWNER
//   dram    0x00000000 to 0x1fffffff    512MiB  cache   -

export function textTable(headers: readonly string[], rows: readonly (readonly string[])[], rightAligned: readonly number[] = []): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: readonly string[]): string =>
    cells
      .map((cell, i) => (rightAligned.includes(i) ? cell.padStart(widths[i] ?? 0) : cell.padEnd(widths[i] ?? 0)))
      .join('  ')
      .trimEnd();
  return [line(headers), ...rows.map(line)].join('\n');
}

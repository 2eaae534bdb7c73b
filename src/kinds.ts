// Names shared by the memory pool: the media a node has and the kinds of use an extent
// can be put to (patent FIG. 12, "usage"). Codes are the indexes, used in typed arrays.

export const MEDIA = ['dram', 'flash'] as const;
export type MediumName = (typeof MEDIA)[number];

export const KINDS = ['free', 'cache', 'server', 'nvram'] as const;
export type Kind = (typeof KINDS)[number];
/** The kinds that hold capacity on purpose; `free` is what is left. */
export type UsedKind = Exclude<Kind, 'free'>;
export const USED_KINDS: readonly UsedKind[] = ['cache', 'server', 'nvram'];

export const KIND_CODE: Readonly<Record<Kind, number>> = { free: 0, cache: 1, server: 2, nvram: 3 };

export function isMediumName(value: string): value is MediumName {
  return (MEDIA as readonly string[]).includes(value);
}

export function isUsedKind(value: string): value is UsedKind {
  return (USED_KINDS as readonly string[]).includes(value);
}

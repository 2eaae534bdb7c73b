// Names shared by every layer that speaks of NVRAM devices: the durability policies and
// the roles of a mirrored pair. They sit with the journal codec, below the devices that
// implement them, so wire codecs (rmem, mirror) and clients can name them without
// importing the NVRAM subsystem.

export const POLICIES = ['volatile', 'local', 'mirrored', 'mirrored+local'] as const;
export type Policy = (typeof POLICIES)[number];
export type Role = 'primary' | 'replica';

export function isMirrored(policy: Policy): boolean {
  return policy === 'mirrored' || policy === 'mirrored+local';
}

/** A device name: 1 to 64 letters, digits, ".", "_" or "-", starting with a letter or digit; never a path. */
export const DEVICE_NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export function isDeviceName(name: string): boolean {
  return DEVICE_NAME_PATTERN.test(name);
}

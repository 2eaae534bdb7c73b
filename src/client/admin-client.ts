// The CLI's client for a node's admin API. Errors come back as the coded errors the
// node raised (the code travels in the JSON body), or as MS_ADMIN_UNREACHABLE /
// MS_ADMIN_RESPONSE when the node could not be reached or answered nonsense. With a
// token, every request carries `Authorization: Bearer <token>`; the token never
// appears in an error message: it is checked when the client is made (visible ASCII,
// as the node requires; MS_ADMIN_TOKEN_INVALID), and an error building the request's
// headers, whose message would quote the header, is never passed on.

import { ERRORS, MemstrataError, MisuseError, NetworkError, type ErrorCode } from '../errors.js';

export const DEFAULT_ADMIN_URL = 'http://127.0.0.1:10880';

// What an Authorization header can carry (RFC 6750 b64token is a subset of it).
const TOKEN_PATTERN = /^[\x21-\x7e]+$/;

/** Options of {@link AdminClient}. */
export interface AdminClientOptions {
  /** The node's admin.token, sent as `Authorization: Bearer <token>`; surrounding whitespace is ignored. */
  token?: string;
  /** Per request, in milliseconds; default 10 s. */
  timeoutMs?: number;
}

/** A client of a node's admin API (`admin.listen`). */
export class AdminClient {
  readonly baseUrl: string;
  private readonly timeoutMs: number;
  private readonly authorization: string | undefined;

  /**
   * @param baseUrl such as `http://127.0.0.1:10880`
   * @param options a token and a timeout; a bare number is the timeout in milliseconds
   * @throws MS_ADMIN_TOKEN_INVALID when the token holds a character a header cannot carry
   */
  constructor(baseUrl: string, options: AdminClientOptions | number = {}) {
    const { token, timeoutMs = 10_000 } = typeof options === 'number' ? { timeoutMs: options } : options;
    this.baseUrl = baseUrl.replace(/\/+$/, '');
    this.timeoutMs = timeoutMs;
    const trimmed = token?.trim() ?? '';
    if (trimmed !== '' && !TOKEN_PATTERN.test(trimmed)) {
      throw new MisuseError('MS_ADMIN_TOKEN_INVALID', 'the admin token (--token or MEMSTRATA_ADMIN_TOKEN) holds a space, a control character or a non-ASCII character, which no HTTP header can carry; it is not shown');
    }
    this.authorization = trimmed === '' ? undefined : `Bearer ${trimmed}`;
  }

  get<T>(path: string): Promise<T> {
    return this.request<T>('GET', path);
  }

  post<T>(path: string, body: unknown): Promise<T> {
    return this.request<T>('POST', path, body);
  }

  patch<T>(path: string, body: unknown): Promise<T> {
    return this.request<T>('PATCH', path, body);
  }

  /** DELETE; resolves when the node answered 2xx. */
  async delete(path: string): Promise<void> {
    const response = await this.fetch('DELETE', path);
    const text = await response.text();
    if (!response.ok) throw this.errorFrom(response.status, text);
  }

  async text(path: string): Promise<string> {
    const response = await this.fetch('GET', path);
    const text = await response.text();
    if (!response.ok) throw this.errorFrom(response.status, text);
    return text;
  }

  /**
   * GET of a body that does not end (a followed log): each chunk as it comes, until the
   * node ends it or `signal` aborts. No request timeout applies once the answer began.
   */
  async follow(path: string, onChunk: (chunk: Uint8Array) => void, signal?: AbortSignal): Promise<void> {
    const response = await this.fetch('GET', path, undefined, signal ?? null);
    if (!response.ok) throw this.errorFrom(response.status, await response.text());
    if (response.body === null) return;
    try {
      for await (const chunk of response.body as AsyncIterable<Uint8Array>) onChunk(chunk);
    } catch (error) {
      if (signal?.aborted !== true) throw error;
    }
  }

  private async request<T>(method: string, path: string, body?: unknown): Promise<T> {
    const response = await this.fetch(method, path, body);
    const text = await response.text();
    if (!response.ok) throw this.errorFrom(response.status, text);
    try {
      return JSON.parse(text) as T;
    } catch (error) {
      throw new NetworkError('MS_ADMIN_RESPONSE', `${this.baseUrl}${path} answered with something that is not JSON`, { cause: error });
    }
  }

  /** `signal` null: no timeout (a followed stream); undefined: the client's request timeout. */
  private async fetch(method: string, path: string, body?: unknown, signal?: AbortSignal | null): Promise<Response> {
    const url = `${this.baseUrl}${path}`;
    const headers = new Headers();
    try {
      if (this.authorization !== undefined) headers.set('authorization', this.authorization);
      if (body !== undefined) headers.set('content-type', 'application/json');
    } catch {
      // The message of a refused header value quotes it: the token.
      throw new MisuseError('MS_ADMIN_TOKEN_INVALID', 'the admin token cannot be sent in an HTTP header; it is not shown');
    }
    try {
      const init: RequestInit = { method, headers, signal: signal === undefined ? AbortSignal.timeout(this.timeoutMs) : signal };
      if (body !== undefined) init.body = JSON.stringify(body);
      return await fetch(url, init);
    } catch (error) {
      const cause = error instanceof Error && error.cause instanceof Error ? error.cause.message : (error as Error).message;
      throw new NetworkError('MS_ADMIN_UNREACHABLE', `cannot reach the admin API at ${this.baseUrl}: ${cause}`, { cause: error });
    }
  }

  private errorFrom(status: number, text: string): MemstrataError {
    try {
      const parsed = JSON.parse(text) as { error?: { code?: unknown; message?: unknown; details?: Record<string, unknown> } };
      const code = parsed.error?.code;
      const message = parsed.error?.message;
      if (typeof code === 'string' && code in ERRORS && typeof message === 'string') {
        return new MemstrataError(code as ErrorCode, message, parsed.error?.details === undefined ? {} : { details: parsed.error.details });
      }
    } catch {
      // Not our JSON: reported below.
    }
    return new NetworkError('MS_ADMIN_RESPONSE', `${this.baseUrl} answered HTTP ${status}: ${text.slice(0, 200)}`);
  }
}

// Shared pieces of every page: the API client, the signed-in person, data hooks, state blocks
// (loading / empty / error), dialogs, toasts and formatting. Pages import from here only.
import { h, render } from "../vendor/preact.mjs";
import { useState, useEffect, useRef, useCallback, useMemo } from "../vendor/preact-hooks.mjs";
import htm from "../vendor/htm.mjs";

export const html = htm.bind(h);
export { h, render, useState, useEffect, useRef, useCallback, useMemo };

// ---------------------------------------------------------------- API

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function cookie(name) {
  for (const part of document.cookie.split(";")) {
    const [k, ...v] = part.trim().split("=");
    if (k === name) return decodeURIComponent(v.join("="));
  }
  return "";
}

/** Calls `/api/v1<path>`. Writes carry the CSRF token; a 401 sends the person to the login page
 *  (and back afterwards). Resolves to the parsed JSON (null for an empty body); rejects with
 *  an ApiError carrying the server's code and message. */
export async function api(method, path, body, opts = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET") headers["X-CSRF-Token"] = cookie("mooring_csrf");
  Object.assign(headers, opts.headers || {});
  let resp;
  try {
    resp = await fetch("/api/v1" + path, {
      method,
      headers,
      credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: opts.signal,
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "network", "The server could not be reached: " + e.message);
  }
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    data = null;
  }
  if (!resp.ok) {
    const err = data && data.error ? data.error : {};
    if (resp.status === 401 && !opts.noRedirect) {
      session.me = null;
      toLogin();
    }
    let message = err.message || resp.statusText || "request failed";
    if (resp.status === 404 && err.code === "route_not_found") {
      message = `This server does not offer ${method} /api/v1${path.split("?")[0]} (404): it may be older than this dashboard.`;
    }
    throw new ApiError(resp.status, err.code || "http_" + resp.status, message);
  }
  if (opts.withHeaders) return { data, headers: resp.headers };
  return data;
}

export function qs(params) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") p.set(k, String(v));
  }
  const s = p.toString();
  return s ? "?" + s : "";
}

// ---------------------------------------------------------------- session and routing

/** The signed-in caller (`GET /auth/me`), or null. */
export const session = { me: null, listeners: new Set() };

export function setMe(me) {
  session.me = me;
  for (const f of session.listeners) f(me);
}

export function can(permission) {
  return !!(session.me && session.me.permissions && session.me.permissions.includes(permission));
}

/** The current route: `#/devices/x?selector=y` -> { path: "devices/x", query: URLSearchParams }. */
export function currentRoute() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query = ""] = raw.split("?");
  return { path: path.replace(/\/+$/, ""), query: new URLSearchParams(query), raw };
}

export function navigate(hash, replace = false) {
  const target = hash.startsWith("#") ? hash : "#/" + hash.replace(/^\//, "");
  if (replace) {
    history.replaceState(null, "", target);
    window.dispatchEvent(new HashChangeEvent("hashchange"));
  } else {
    location.hash = target;
  }
}

export function toLogin() {
  const { path, raw } = currentRoute();
  if (path === "login" || path === "set-password") return;
  navigate("#/login" + (raw ? "?next=" + encodeURIComponent(raw) : ""), true);
}

// ---------------------------------------------------------------- hooks

/** Loads `path` (GET) when it changes; `reload()` fetches again. */
export function useApi(path, deps = []) {
  const [state, setState] = useState({ loading: !!path, data: null, error: null });
  const [tick, setTick] = useState(0);
  useEffect(() => {
    if (!path) {
      setState({ loading: false, data: null, error: null });
      return;
    }
    const ctrl = new AbortController();
    setState((s) => ({ ...s, loading: true, error: null }));
    api("GET", path, undefined, { signal: ctrl.signal })
      .then((data) => setState({ loading: false, data, error: null }))
      .catch((error) => {
        if (error.name !== "AbortError") setState({ loading: false, data: null, error });
      });
    return () => ctrl.abort();
  }, [path, tick, ...deps]);
  const reload = useCallback(() => setTick((t) => t + 1), []);
  return {
    ...state,
    reload,
    setData: (data) => setState((s) => ({ ...s, data })),
    /** Changes the loaded data from its current value (not the one this render saw). */
    update: (f) => setState((s) => (s.data == null ? s : { ...s, data: f(s.data) })),
  };
}

/** Calls `fn` every `ms` while `active`. */
export function useInterval(fn, ms, active = true) {
  const ref = useRef(fn);
  ref.current = fn;
  useEffect(() => {
    if (!active) return;
    const t = setInterval(() => ref.current(), ms);
    return () => clearInterval(t);
  }, [ms, active]);
}

/** Live events (`GET /api/v1/events`, docs/events.md) for a selector; `onEvent(kind, data)`. */
export function useEvents(selector, onEvent, active = true) {
  const ref = useRef(onEvent);
  ref.current = onEvent;
  useEffect(() => {
    if (!active || !can("events.read")) return;
    const es = new EventSource("/api/v1/events" + qs({ selector }));
    const kinds = ["presence", "telemetry", "command", "shadow", "reset"];
    const handlers = kinds.map((k) => {
      const f = (e) => {
        let data = null;
        try {
          data = JSON.parse(e.data);
        } catch (_) {
          return;
        }
        ref.current(k, data);
      };
      es.addEventListener(k, f);
      return f;
    });
    return () => {
      kinds.forEach((k, i) => es.removeEventListener(k, handlers[i]));
      es.close();
    };
  }, [selector, active]);
}

/** A value that follows `value` after it has stopped changing for `ms`. */
export function useDebounced(value, ms) {
  const [v, setV] = useState(value);
  useEffect(() => {
    const t = setTimeout(() => setV(value), ms);
    return () => clearTimeout(t);
  }, [value, ms]);
  return v;
}

// ---------------------------------------------------------------- toasts

const toastListeners = new Set();
let toastSeq = 0;
export function toast(message, kind = "info") {
  const t = { id: ++toastSeq, message, kind };
  for (const f of toastListeners) f(t);
}

export function Toasts() {
  const [items, setItems] = useState([]);
  useEffect(() => {
    const f = (t) => {
      setItems((xs) => [...xs.slice(-3), t]);
      setTimeout(() => setItems((xs) => xs.filter((x) => x.id !== t.id)), 6000);
    };
    toastListeners.add(f);
    return () => toastListeners.delete(f);
  }, []);
  return html`<div class="toasts" aria-live="polite">
    ${items.map(
      (t) => html`<div key=${t.id} class=${"toast " + t.kind} data-testid="toast" role="status">${t.message}</div>`,
    )}
  </div>`;
}

// ---------------------------------------------------------------- state blocks

export function Loading({ label = "Loading…" }) {
  return html`<div class="state loading" data-testid="loading" role="status" aria-live="polite"><span class="spinner" aria-hidden="true"></span>${label}</div>`;
}

export function Empty({ children }) {
  return html`<div class="state empty" data-testid="empty">${children}</div>`;
}

export function ErrorBox({ error, retry }) {
  if (!error) return null;
  const heading = error.status === 403 ? "Not allowed" : error.status >= 400 && error.status < 500 && error.status !== 404 ? "Not accepted" : "Something went wrong";
  return html`<div class="state error" data-testid="error" role="alert">
    <strong>${heading}</strong>
    <span>${error.message}${error.code && error.status ? ` (${error.code})` : ""}</span>
    ${retry && html`<button type="button" class="btn" onClick=${retry}>Try again</button>`}
  </div>`;
}

/** Shows loading / error / the children for a useApi result. */
export function Async({ res, children, label }) {
  if (res.error) return html`<${ErrorBox} error=${res.error} retry=${res.reload} />`;
  if (res.loading && !res.data) return html`<${Loading} label=${label} />`;
  if (!res.data) return null;
  return children(res.data);
}

// ---------------------------------------------------------------- dialogs

/** A modal dialog (native <dialog>): focus moves in, Esc closes, focus returns to where it was. */
export function Dialog({ title, onClose, children, testid, wide }) {
  const ref = useRef(null);
  useEffect(() => {
    const back = document.activeElement;
    const d = ref.current;
    if (d && !d.open) d.showModal();
    const first = d && d.querySelector("[autofocus], input, textarea, select, button:not(.dialog-x)");
    if (first) first.focus();
    return () => {
      if (d && d.open) d.close();
      if (back && back.focus && document.contains(back)) back.focus();
    };
  }, []);
  const onCancel = (e) => {
    e.preventDefault();
    onClose();
  };
  return html`<dialog ref=${ref} class=${"dialog" + (wide ? " wide" : "")} data-testid=${testid} aria-labelledby="dialog-title" onCancel=${onCancel}>
    <div class="dialog-head">
      <h2 id="dialog-title">${title}</h2>
      <button type="button" class="btn ghost dialog-x" aria-label="Close" onClick=${onClose}>✕</button>
    </div>
    ${children}
  </dialog>`;
}

/** A confirmation: `text` names what happens (e.g. "Tag 37 devices"). */
export function Confirm({ title, text, okLabel = "Confirm", danger, onOk, onCancel, busy }) {
  return html`<${Dialog} title=${title} onClose=${onCancel} testid="confirm-dialog">
    <p class="confirm-text">${text}</p>
    <div class="actions">
      <button type="button" class="btn" data-testid="confirm-cancel" onClick=${onCancel} autofocus=${!!danger}>Cancel</button>
      <button type="button" class=${"btn " + (danger ? "danger" : "primary")} data-testid="confirm-ok" disabled=${busy} onClick=${onOk} autofocus=${!danger}>${okLabel}</button>
    </div>
  </${Dialog}>`;
}

// ---------------------------------------------------------------- formatting

const nf = new Intl.NumberFormat("en-US");
export const fmtNum = (n) => (n === null || n === undefined ? "–" : nf.format(n));

export function fmtTime(ms) {
  if (!ms) return "–";
  const d = new Date(ms);
  return d.toLocaleString(undefined, { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function fmtAgo(ms) {
  if (!ms) return "never";
  const s = Math.round((Date.now() - ms) / 1000);
  if (s < 5) return "just now";
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

export function plural(n, word, many = word + "s") {
  return `${fmtNum(n)} ${n === 1 ? word : many}`;
}

export function PageTitle({ children, sub, title }) {
  const text = title || (typeof children === "string" ? children : Array.isArray(children) && children.every((c) => typeof c === "string") ? children.join("") : "");
  useEffect(() => {
    document.title = text ? text + " · Mooring" : "Mooring";
  }, [text]);
  return html`<div class="page-head"><h1 data-testid="page-title" tabindex="-1">${children}</h1>${sub && html`<p class="sub">${sub}</p>`}</div>`;
}

export function StateBadge({ state }) {
  return html`<span class=${"badge s-" + state}>${state}</span>`;
}

export function OnlineBadge({ online, testid }) {
  return html`<span class=${"badge " + (online ? "on" : "off")} data-testid=${testid}>${online ? "online" : "offline"}</span>`;
}

/** Parses JSON typed by a person: returns [value, null] or [null, message]. */
export function parseJson(text, { object = true } = {}) {
  if (!text.trim()) return [{}, null];
  try {
    const v = JSON.parse(text);
    if (object && (v === null || typeof v !== "object" || Array.isArray(v))) return [null, "must be a JSON object, e.g. {\"key\": 1}"];
    return [v, null];
  } catch (e) {
    return [null, "not valid JSON: " + e.message];
  }
}

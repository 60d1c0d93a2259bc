// #/devices/<id>: one device: facts and tags, its gateway or its children (attach, detach), its
// provisioning pipeline and installation (with the installer's confirmation form), live
// telemetry chart, shadow (reported vs desired, with an editor), commands (history with live
// states, send, cancel), updates (OTA history and the A/B slots its agent reports), health
// signals, delete.
import {
  html, useState, useEffect, useMemo, useRef, useCallback, api, qs, useApi, useEvents, useInterval, can, toast,
  navigate, Loading, Empty, ErrorBox, Async, Dialog, Confirm, PageTitle, OnlineBadge, StateBadge,
  fmtTime, fmtAgo, fmtNum, parseJson,
} from "../lib.js";
import { TimeChart } from "../chart.js";
import { STATES as OTA_STATES } from "./ota.js";

const RANGES = [
  { key: "15m", label: "Last 15 minutes", ms: 15 * 60_000 },
  { key: "1h", label: "Last hour", ms: 3_600_000 },
  { key: "6h", label: "Last 6 hours", ms: 6 * 3_600_000 },
  { key: "24h", label: "Last 24 hours", ms: 24 * 3_600_000 },
  { key: "7d", label: "Last 7 days", ms: 7 * 24 * 3_600_000 },
];
/** Points the API returns for one metric in one request (its `limit` bound). */
const POINTS_PER_METRIC_MAX = 10_000;
/** Requests per metric for one range (so at most 50,000 points per metric are loaded). */
const PAGES_MAX = 5;
/** Points kept in the chart per metric while live points arrive. */
const LIVE_POINTS_MAX = 20_000;
const CANCELLABLE = new Set(["queued", "delivered"]);
/** How far along a command state is: live events, a reload and a send's answer can arrive in
 * any order, and a row never goes back to an earlier state. */
const STATE_RANK = { queued: 0, delivered: 1, acknowledged: 2 };
const rank = (state) => STATE_RANK[state] ?? 3;
const newer = (a, b) => (b && rank(b) > rank(a) ? b : a);
/** Command ids whose newest live state is remembered (beyond this the memory starts over). */
const LIVE_STATES_MAX = 500;
const COMMANDS_PAGE = 20;
/** Children listed per request on a gateway's page (the API's default page). */
const CHILDREN_PAGE = 100;

const enc = encodeURIComponent;

// ---------------------------------------------------------------- info + tags

function TagsEditor({ device, onSaved }) {
  const [editing, setEditing] = useState(false);
  const [rows, setRows] = useState([]);
  const [error, setError] = useState(null);
  const start = () => {
    setRows([...Object.entries(device.tags || {}), ["", ""]]);
    setError(null);
    setEditing(true);
  };
  const save = async (e) => {
    e.preventDefault();
    const tags = {};
    for (const [k, v] of rows) if (k.trim()) tags[k.trim()] = v.trim();
    try {
      await api("PUT", `/devices/${enc(device.id)}/tags`, { tags });
      setEditing(false);
      toast("Tags saved");
      onSaved();
    } catch (err) {
      setError(err.message);
    }
  };
  const set = (i, j, v) => setRows(rows.map((r, k) => (k === i ? (j === 0 ? [v, r[1]] : [r[0], v]) : r)));
  return html`<div>
    <div class="tags" data-testid="device-tags">
      ${Object.keys(device.tags || {}).length === 0 && html`<span class="muted">no tags</span>`}
      ${Object.entries(device.tags || {}).map(([k, v]) => html`<span class="tag" key=${k}>${k}=${v}</span>`)}
      ${can("devices.write") && html`<button type="button" class="btn small" data-testid="tag-edit" onClick=${start}>Edit tags</button>`}
    </div>
    ${editing && html`<${Dialog} title="Edit tags" onClose=${() => setEditing(false)} testid="tags-dialog">
      <form onSubmit=${save}>
        <p class="hint">Empty key: the row is dropped. A tag left out is removed.</p>
        ${rows.map((r, i) => html`<div class="row2" key=${i}>
          <label>Key<input value=${r[0]} onInput=${(e) => set(i, 0, e.target.value)} data-testid="tag-key" /></label>
          <label>Value<input value=${r[1]} onInput=${(e) => set(i, 1, e.target.value)} data-testid="tag-value" /></label>
        </div>`)}
        <button type="button" class="btn small" onClick=${() => setRows([...rows, ["", ""]])}>Add a tag</button>
        ${error && html`<p class="form-error" role="alert">${error}</p>`}
        <div class="actions">
          <button type="button" class="btn" onClick=${() => setEditing(false)}>Cancel</button>
          <button type="submit" class="btn primary" data-testid="tag-save">Save tags</button>
        </div>
      </form>
    </${Dialog}>`}
  </div>`;
}

function Info({ device, online, onReload }) {
  return html`<section class="card">
    <h2>Device</h2>
    <dl class="facts">
      <dt>Id</dt><dd class="mono">${device.id}</dd>
      <dt>State</dt><dd><${OnlineBadge} online=${online} testid="device-online" /></dd>
      <dt>Last seen</dt><dd>${online ? "now" : device.last_seen ? fmtTime(device.last_seen) + " (" + fmtAgo(device.last_seen) + ")" : "never"}</dd>
      <dt>Certificate</dt><dd><span class="mono" title="serial number">${device.cert_serial}</span><br /><span class="muted">valid until ${fmtTime(device.cert_not_after)}</span></dd>
      <dt>Created</dt><dd>${fmtTime(device.created_at)}</dd>
      <dt>Firmware</dt><dd data-testid="device-version" class=${device.version ? "mono" : "muted"}>${device.version || "not reported"}</dd>
      <dt>Tags</dt><dd><${TagsEditor} device=${device} onSaved=${onReload} /></dd>
    </dl>
  </section>`;
}

// ---------------------------------------------------------------- gateway

function AttachForm({ id, onDone }) {
  const [gateway, setGateway] = useState("");
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const submit = async (e) => {
    e.preventDefault();
    if (!gateway.trim()) return setError("Enter the gateway's device id.");
    setBusy(true);
    setError(null);
    try {
      const a = await api("PUT", `/devices/${enc(id)}/gateway`, { gateway: gateway.trim() });
      toast(`${id} attached to gateway ${a.gateway}`);
      setGateway("");
      onDone();
    } catch (err) {
      setError(err.message);
    } finally {
      setBusy(false);
    }
  };
  return html`<form class="filters" data-testid="gateway-attach-form" onSubmit=${submit}>
    <label>Attach to gateway<input data-testid="gateway-attach-id" class="mono" value=${gateway} onInput=${(e) => setGateway(e.target.value)} placeholder="gw-1" autocomplete="off" spellcheck="false" required /></label>
    <button type="submit" class="btn primary" data-testid="gateway-attach-submit" disabled=${busy}>Attach</button>
  </form>
  ${error && html`<p class="form-error" data-testid="gateway-attach-error" role="alert">${error}</p>`}`;
}

/** The gateway this device is attached to (GET /devices/{id}/gateway, 404 `not_attached` when
 *  none) and the children attached to it (GET /devices/{id}/children), docs/edge.md. */
function Gateway({ id }) {
  const gw = useApi(`/devices/${enc(id)}/gateway`, [id]);
  const kids = useApi(`/devices/${enc(id)}/children` + qs({ limit: CHILDREN_PAGE }), [id]);
  const [confirmDetach, setConfirmDetach] = useState(false);
  const [busy, setBusy] = useState(false);
  // Not being a child is no error here.
  const alone = gw.error && gw.error.code === "not_attached";
  const attachment = gw.data;
  const reload = () => {
    gw.reload();
    kids.reload();
  };
  const detach = async () => {
    setBusy(true);
    try {
      await api("DELETE", `/devices/${enc(id)}/gateway`);
      toast(`${id} detached from gateway ${attachment.gateway}`);
      reload();
    } catch (e) {
      toast("Detach failed: " + e.message, "error");
    } finally {
      setBusy(false);
      setConfirmDetach(false);
    }
  };
  const more = async () => {
    try {
      const next = await api("GET", `/devices/${enc(id)}/children` + qs({ limit: CHILDREN_PAGE, cursor: kids.data.next_cursor }));
      const seen = new Set(kids.data.children.map((c) => c.id));
      kids.setData({ ...next, children: [...kids.data.children, ...next.children.filter((c) => !seen.has(c.id))] });
    } catch (e) {
      toast("Could not load more children: " + e.message, "error");
    }
  };
  const body = () => {
    if (gw.error && !alone) return html`<${ErrorBox} error=${gw.error} retry=${gw.reload} />`;
    if (kids.error) return html`<${ErrorBox} error=${kids.error} retry=${kids.reload} />`;
    if ((!attachment && !alone) || !kids.data) return html`<${Loading} label="Loading the gateway…" />`;
    const children = kids.data.children;
    return html`
      ${attachment && html`<div class="card-head">
        <p data-testid="gateway-attached" data-gateway=${attachment.gateway}>Attached to gateway <a href=${"#/devices/" + enc(attachment.gateway)} class="mono" data-testid="gateway-link">${attachment.gateway}</a>
          <span class="muted"> since ${fmtTime(attachment.attached_at)} (${fmtAgo(attachment.attached_at)})</span></p>
        ${can("devices.write") && html`<button type="button" class="btn small" data-testid="gateway-detach" onClick=${() => setConfirmDetach(true)}>Detach</button>`}
      </div>`}
      ${children.length > 0 && html`<h3>Children</h3>
        <div class="table-wrap"><table class="table" aria-label=${"Children of gateway " + id}>
          <thead><tr><th>Device</th><th>State</th><th>Attached</th></tr></thead>
          <tbody>${children.map((c) => html`<tr key=${c.id} data-testid="gateway-child" data-child-id=${c.id} data-online=${String(c.online)}>
            <td data-label="Device"><a href=${"#/devices/" + enc(c.id)} class="mono">${c.id}</a></td>
            <td data-label="State"><${OnlineBadge} online=${c.online} /></td>
            <td data-label="Attached">${fmtTime(c.attached_at)}</td>
          </tr>`)}</tbody></table></div>
        ${kids.data.next_cursor && html`<div class="pager"><button type="button" class="btn small" data-testid="gateway-children-more" onClick=${more}>Show more children</button></div>`}`}
      ${!attachment && children.length === 0 && html`<${Empty}>Not attached to a gateway and no children.</${Empty}>
        ${can("devices.write") && html`<${AttachForm} id=${id} onDone=${reload} />`}`}`;
  };
  return html`<section class="card" data-testid="device-gateway">
    <h2>Gateway</h2>
    ${body()}
    ${confirmDetach && attachment && html`<${Confirm} title="Detach from gateway" text=${`Detach ${id} from gateway ${attachment.gateway}? The gateway may no longer act for it, and it goes offline until it is attached again.`}
      okLabel="Detach" danger busy=${busy} onOk=${detach} onCancel=${() => setConfirmDetach(false)} />`}
  </section>`;
}

// ---------------------------------------------------------------- provisioning

const STEP_LABELS = {
  claimed: "Claimed",
  certificate_issued: "Certificate issued",
  registered: "Registered",
  first_connect: "First connect",
  first_telemetry: "First telemetry",
};

function InstallForm({ id, onDone }) {
  const [location, setLocation] = useState("");
  const [notes, setNotes] = useState("");
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const body = { location };
      if (notes.trim()) body.notes = notes;
      await api("POST", `/devices/${enc(id)}/installation`, body);
      toast(`Installation of ${id} recorded`);
      setLocation("");
      setNotes("");
      onDone();
    } catch (err) {
      setError(err.message);
    } finally {
      setBusy(false);
    }
  };
  return html`<form class="stack" data-testid="install-form" onSubmit=${submit}>
    <h3>Confirm installation</h3>
    <label>Location<input data-testid="install-location" value=${location} onInput=${(e) => setLocation(e.target.value)} placeholder="Hall 3, door 2" maxlength="256" required /></label>
    <label>Notes<textarea data-testid="install-notes" rows="2" value=${notes} onInput=${(e) => setNotes(e.target.value)} maxlength="2048"></textarea></label>
    ${error && html`<p class="form-error" data-testid="install-error" role="alert">${error}</p>`}
    <button type="submit" class="btn primary" data-testid="install-submit" disabled=${busy}>Record installation</button>
  </form>`;
}

/** Fewest milliseconds between two reloads of the pipeline caused by live events. */
const PIPELINE_RELOAD_MIN_MS = 2_000;

function Provisioning({ id, reloadRef }) {
  const res = useApi(`/devices/${enc(id)}/provisioning`, [id]);
  const last = useRef(0);
  // Live events (presence, telemetry) may complete a pending step; the server records first
  // connect and first telemetry with its next presence flush, so a reload waits a moment.
  reloadRef.current = () => {
    const pending = !res.data || res.data.steps.some((s) => s.state === "pending");
    const now = Date.now();
    if (!pending || now - last.current < PIPELINE_RELOAD_MIN_MS) return;
    last.current = now;
    res.reload();
  };
  return html`<section class="card" data-testid="provisioning">
    <h2>Provisioning</h2>
    <${Async} res=${res} label="Loading the pipeline…">${(p) => html`
      <ol class="pipeline" data-testid="pipeline">
        ${p.steps.map((s) => html`<li key=${s.step} data-testid=${"step-" + s.step} data-state=${s.state} class=${"step " + s.state}>
          <span class="step-name">${STEP_LABELS[s.step] || s.step}</span>
          <span class=${"badge s-" + (s.state === "done" ? "succeeded" : s.state === "pending" ? "queued" : "skipped")}>${s.state}</span>
          ${s.at && html`<span class="muted">${fmtTime(s.at)}</span>`}
          ${s.last_error && html`<div class="step-error" data-testid=${"step-error-" + s.step}>Last error ${fmtAgo(s.last_error.at)}: ${s.last_error.message}</div>`}
        </li>`)}
      </ol>
      <div data-testid="installation">
        ${p.installation
          ? html`<p>Installed ${fmtTime(p.installation.at)} by <b>${p.installation.by}</b> at <b>${p.installation.location}</b>${p.installation.notes && html` — ${p.installation.notes}`}</p>`
          : html`<p class="muted">No installation recorded yet.</p>`}
      </div>
      ${can("installations.write") && html`<${InstallForm} id=${id} onDone=${res.reload} />`}
    `}</${Async}>
  </section>`;
}

// ---------------------------------------------------------------- health

const HEALTH_SIGNALS = [
  ["connects", "Connects"],
  ["disconnects", "Disconnects"],
  ["telemetry_gaps", "Telemetry gaps"],
  ["command_failures", "Command failures"],
  ["command_timeouts", "Command timeouts"],
  ["restarts", "Agent restarts"],
  ["crashes", "Crashes"],
  ["update_rollbacks", "Update rollbacks"],
  ["update_failures", "Update failures"],
];
/** How often the health card reloads (the server writes signals every few seconds). */
const HEALTH_RELOAD_MS = 5000;

function fmtDuration(ms) {
  const s = Math.round(ms / 1000);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.round(s / 60) + " min";
  if (s < 86400) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}

/** The device's health signals (GET /devices/{id}/health, docs/health.md). */
function Health({ id }) {
  const res = useApi(`/devices/${enc(id)}/health`, [id]);
  useInterval(() => res.reload(), HEALTH_RELOAD_MS);
  return html`<section class="card" data-testid="device-health">
    <h2>Health</h2>
    <${Async} res=${res} label="Loading health…">${(h) => html`
      <div class="grid2">
        <dl class="facts">
          <dt>Reconnects</dt><dd data-testid="health-reconnects">${h.reconnects_per_hour.toFixed(2)} per hour</dd>
          <dt>Online for</dt><dd>${fmtDuration(h.online_ms)}${h.since_ms ? html` <span class="muted">since ${fmtTime(h.since_ms)}</span>` : ""}</dd>
          <dt>Telemetry</dt><dd>${h.telemetry.last_ms ? fmtAgo(h.telemetry.last_ms) : "never"}${h.telemetry.longest_gap_ms > 0 ? html` <span class="muted">longest gap ${fmtDuration(h.telemetry.longest_gap_ms)}</span>` : ""}</dd>
          <dt>Battery</dt><dd data-testid="health-battery">${h.battery
            ? html`${fmtNum(h.battery.level)}${h.battery.trend_per_hour != null ? html` <span class="muted">(${h.battery.trend_per_hour >= 0 ? "+" : ""}${h.battery.trend_per_hour.toFixed(2)}/h${h.battery.hours_to_empty != null ? `, empty in ${h.battery.hours_to_empty.toFixed(0)} h` : ""})</span>` : ""}`
            : html`<span class="muted">not reported</span>`}</dd>
          <dt>Agent</dt><dd>${h.agent.boots != null ? `${h.agent.boots} starts, ${h.agent.unclean_stops ?? 0} unclean` : html`<span class="muted">not reported</span>`}</dd>
          <dt>Diagnostics</dt><dd>${h.last_diagnostics ? html`<span class="mono">${h.last_diagnostics.command_id}</span> ${h.last_diagnostics.state} <span class="muted">${fmtAgo(h.last_diagnostics.at_ms)}</span>` : html`<span class="muted">none</span>`}</dd>
          <dt>Update problem</dt><dd>${h.last_update_problem ? html`${h.last_update_problem.version} ${h.last_update_problem.state}${h.last_update_problem.reason ? ": " + h.last_update_problem.reason : ""} <span class="muted">${fmtAgo(h.last_update_problem.at_ms)}</span>` : html`<span class="muted">none</span>`}</dd>
        </dl>
        <div class="table-wrap"><table class="table">
          <thead><tr><th>Signal</th><th>Last 24 h</th><th>Total</th></tr></thead>
          <tbody>${HEALTH_SIGNALS.map(([key, label]) => html`<tr key=${key} data-testid="health-count" data-signal=${key} data-total=${String(h.totals[key])}>
            <td>${label}</td><td>${h.last_24h[key]}</td><td>${h.totals[key]}</td>
          </tr>`)}</tbody>
        </table></div>
      </div>
    `}</${Async}>
  </section>`;
}

// ---------------------------------------------------------------- updates (OTA)

const OTA_LABELS = Object.fromEntries(OTA_STATES);
const OTA_FINAL = new Set(["committed", "rolled_back", "failed"]);

/** The device's updates, newest first, and its A/B slots as its agent reports them (shadow
 *  `reported.ota`); live while an update is on its way. */
function Updates({ id }) {
  const res = useApi(`/devices/${enc(id)}/ota`, [id]);
  const shadow = useApi(can("shadow.read") ? `/devices/${enc(id)}/shadow` : null, [id]);
  const running = (res.data?.updates || []).some((u) => !OTA_FINAL.has(u.state));
  useInterval(() => {
    res.reload();
    shadow.reload();
  }, 3000, running);
  const ota = shadow.data?.reported?.ota;
  return html`<section class="card" data-testid="device-ota">
    <h2>Updates</h2>
    ${ota && ota.slots && html`<div class="slots" data-testid="slots">
      ${Object.entries(ota.slots).map(([name, slot]) => html`<div class=${"slot" + (ota.active === name ? " active" : "")} data-testid="slot" data-slot=${name} data-active=${String(ota.active === name)}>
        <strong>Slot ${name.toUpperCase()}</strong> ${ota.active === name ? html`<span class="badge on">running</span>` : ""}
        <div>${slot.version || html`<span class="muted">empty</span>`}</div>
        ${slot.state && html`<div class="muted">${slot.state}</div>`}
      </div>`)}
    </div>`}
    <${Async} res=${res} label="Loading updates…">${(d) => d.updates.length === 0 ? html`<${Empty}>No update sent to this device.</${Empty}>` : html`<div class="table-wrap"><table class="table">
      <thead><tr><th>Version</th><th>State</th><th>Running</th><th>Deployment</th><th>Updated</th></tr></thead>
      <tbody>${d.updates.map((u) => html`<tr key=${u.deployment_id} data-testid="ota-row" data-state=${u.state}>
        <td data-label="Version">${u.version}</td>
        <td data-label="State"><span class=${"badge ota-" + u.state}>${OTA_LABELS[u.state] || u.state}${u.state === "downloading" && u.progress_pct != null ? ` ${u.progress_pct}%` : ""}</span>${u.reason ? html`<div class="muted" data-testid="ota-reason">${u.reason}</div>` : ""}</td>
        <td data-label="Running">${u.running_version || html`<span class="muted">–</span>`}</td>
        <td data-label="Deployment"><a href="#/ota"><code>${u.deployment_id}</code></a></td>
        <td data-label="Updated">${fmtTime(u.updated_at)}</td>
      </tr>`)}</tbody></table></div>`}</${Async}>
  </section>`;
}

// ---------------------------------------------------------------- telemetry

function toNum(v) {
  if (typeof v === "number") return v;
  if (typeof v === "boolean") return v ? 1 : 0;
  return null;
}

/** Aligns per-metric point lists into uPlot's [xs, ys...] (seconds, nulls where absent). */
function align(metrics, byMetric) {
  const rows = new Map();
  metrics.forEach((m, i) => {
    for (const p of byMetric[m] || []) {
      let row = rows.get(p.ts);
      if (!row) rows.set(p.ts, (row = new Array(metrics.length).fill(null)));
      row[i] = toNum(p.value);
    }
  });
  const ts = [...rows.keys()].sort((a, b) => a - b);
  const data = [ts.map((t) => t / 1000)];
  metrics.forEach((_, i) => data.push(ts.map((t) => rows.get(t)[i])));
  return { data, lastTs: ts.length ? ts[ts.length - 1] : null };
}

function Telemetry({ id, liveRef }) {
  const latest = useApi(can("telemetry.read") ? `/devices/${enc(id)}/telemetry/latest` : null);
  const [metrics, setMetrics] = useState(null);
  const [range, setRange] = useState("1h");
  const [byMetric, setByMetric] = useState({});
  const [state, setState] = useState({ loading: false, error: null });
  const [zoomed, setZoomed] = useState(false);
  const [truncated, setTruncated] = useState(false);
  const reset = useRef(null);

  const names = latest.data ? Object.keys(latest.data.metrics).filter((m) => toNum(latest.data.metrics[m].value) !== null) : [];
  useEffect(() => {
    if (latest.data && metrics === null && names.length > 0) setMetrics(names.slice(0, 1));
  }, [latest.data]);

  const rangeMs = RANGES.find((r) => r.key === range).ms;
  useEffect(() => {
    if (!metrics || metrics.length === 0) return;
    const ctrl = new AbortController();
    const from = Date.now() - rangeMs;
    setState({ loading: true, error: null });
    // The API returns at most POINTS_PER_METRIC_MAX points per request, oldest first: page
    // forward from the last one, up to PAGES_MAX requests per metric.
    const load = async (m) => {
      let points = [];
      let start = from;
      for (let i = 0; i < PAGES_MAX; i++) {
        const r = await api("GET", `/devices/${enc(id)}/telemetry` + qs({ metric: m, from: start, limit: POINTS_PER_METRIC_MAX }), undefined, { signal: ctrl.signal });
        points = points.concat(r.points);
        if (r.points.length < POINTS_PER_METRIC_MAX) return [m, points, false];
        start = r.points[r.points.length - 1].ts + 1;
      }
      return [m, points, true];
    };
    Promise.all(metrics.map(load))
      .then((triples) => {
        setByMetric(Object.fromEntries(triples.map(([m, p]) => [m, p])));
        setTruncated(triples.some(([, , t]) => t));
        setState({ loading: false, error: null });
        setZoomed(false);
      })
      .catch((e) => e.name !== "AbortError" && setState({ loading: false, error: e }));
    return () => ctrl.abort();
  }, [id, (metrics || []).join(","), rangeMs]);

  // Live points from the device page's event stream.
  liveRef.current = (ev) => {
    if (!metrics) {
      latest.reload();
      return;
    }
    const fresh = Object.entries(ev.points || {}).filter(([m]) => metrics.includes(m));
    if (Object.keys(ev.points || {}).some((m) => !names.includes(m))) latest.reload();
    if (fresh.length === 0) return;
    setByMetric((prev) => {
      const next = { ...prev };
      for (const [m, v] of fresh) next[m] = [...(next[m] || []).slice(-LIVE_POINTS_MAX), { ts: ev.ts, value: v }];
      return next;
    });
  };

  const chosen = metrics || [];
  const { data, lastTs } = useMemo(() => align(chosen, byMetric), [byMetric, chosen.join(",")]);
  const plotted = data.slice(1).reduce((n, ys) => n + ys.filter((y) => y !== null).length, 0);

  if (!can("telemetry.read")) return null;
  const toggle = (m, on) => setMetrics(on ? [...chosen, m] : chosen.filter((x) => x !== m));
  return html`<section class="card">
    <div class="card-head">
      <h2>Telemetry</h2>
      <label class="inline">Range
        <select data-testid="range-picker" value=${range} onChange=${(e) => setRange(e.target.value)}>
          ${RANGES.map((r) => html`<option value=${r.key}>${r.key}</option>`)}
        </select>
      </label>
      ${zoomed && html`<button type="button" class="btn small" data-testid="zoom-reset" onClick=${() => reset.current && reset.current()}>Reset zoom</button>`}
    </div>
    <${Async} res=${latest} label="Loading metrics…">${() =>
      names.length === 0
        ? html`<${Empty}>This device has sent no telemetry yet.</${Empty}>`
        : html`
          <fieldset class="metrics" data-testid="metric-picker">
            <legend>Metrics</legend>
            ${names.map((m) => html`<label class="check-chip" key=${m}><input type="checkbox" data-testid=${"metric-" + m} checked=${chosen.includes(m)} onChange=${(e) => toggle(m, e.target.checked)} /> ${m}</label>`)}
          </fieldset>
          ${state.error && html`<${ErrorBox} error=${state.error} />`}
          ${chosen.length === 0 ? html`<${Empty}>Pick a metric to plot.</${Empty}>`
            : html`<div class="chart-wrap">
              ${state.loading && html`<div class="chart-overlay"><${Loading} label="Loading points…" /></div>`}
              <${TimeChart} testid="telemetry-chart" label=${"Telemetry: " + chosen.join(", ")} data=${data}
                series=${chosen.map((m) => ({ label: m }))} attrs=${{ "data-points": plotted, "data-last-ts": lastTs ?? "" }}
                onZoom=${setZoomed} resetRef=${reset} />
              <p class="hint">Drag across the chart to zoom in. ${fmtNum(plotted)} points; new ones appear live.
                ${truncated && html` Only the oldest ${fmtNum(POINTS_PER_METRIC_MAX * PAGES_MAX)} points per metric of this range were loaded: pick a shorter range for the latest ones.`}</p>
            </div>`}`}
    </${Async}>
  </section>`;
}

// ---------------------------------------------------------------- shadow

/** The JSON merge patch (RFC 7396) that turns `from` into `to`. */
function mergePatch(from, to) {
  const patch = {};
  for (const k of Object.keys(from)) if (!(k in to)) patch[k] = null;
  for (const [k, v] of Object.entries(to)) {
    const a = from[k];
    const isObj = (x) => x && typeof x === "object" && !Array.isArray(x);
    if (isObj(a) && isObj(v)) {
      const sub = mergePatch(a, v);
      if (Object.keys(sub).length) patch[k] = sub;
    } else if (JSON.stringify(a) !== JSON.stringify(v)) patch[k] = v;
  }
  return patch;
}

function Shadow({ id, shadowRef }) {
  const res = useApi(can("shadow.read") ? `/devices/${enc(id)}/shadow` : null);
  const [editing, setEditing] = useState(false);
  const [text, setText] = useState("");
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const [base, setBase] = useState(null); // the shadow as it was when editing began
  shadowRef.current = (ev) => {
    if (res.data) res.setData({ ...res.data, desired: ev.desired ?? res.data.desired, reported: ev.reported ?? res.data.reported, version: ev.version ?? res.data.version });
  };
  if (!can("shadow.read")) return null;
  const start = () => {
    setBase(res.data);
    setText(JSON.stringify(res.data.desired, null, 2));
    setError(null);
    setEditing(true);
  };
  const save = async () => {
    const [doc, err] = parseJson(text);
    if (err) return setError("Desired " + err);
    setBusy(true);
    setError(null);
    try {
      const s = await api("PATCH", `/devices/${enc(id)}/shadow`, { desired: mergePatch(base.desired, doc) }, { headers: { "If-Match": `"${base.version}"` } });
      res.setData(s);
      setEditing(false);
      toast("Desired state saved (version " + s.version + ")");
    } catch (e) {
      setError(e.status === 412 ? `The shadow changed while you edited it (you started from version ${base.version}): cancel and edit again. (${e.message})` : e.message);
    } finally {
      setBusy(false);
    }
  };
  return html`<section class="card">
    <div class="card-head">
      <h2>Shadow</h2>
      ${res.data && html`<span class="muted" data-testid="shadow-version">version ${res.data.version}</span>`}
      ${res.data && can("shadow.write") && !editing && html`<button type="button" class="btn small" data-testid="shadow-edit" onClick=${start}>Edit desired</button>`}
    </div>
    <${Async} res=${res}>${(s) => html`<div class="grid2 shadow">
      <div><h3>Reported <span class="muted">(by the device)</span></h3><pre class="json" data-testid="shadow-reported">${JSON.stringify(s.reported, null, 2)}</pre></div>
      <div><h3>Desired <span class="muted">(set here)</span></h3>
        ${editing
          ? html`<textarea class="json mono" rows="10" data-testid="shadow-desired-editor" aria-label="Desired state as JSON" value=${text} onInput=${(e) => setText(e.target.value)}></textarea>
            ${error && html`<p class="form-error" data-testid="shadow-error" role="alert">${error}</p>`}
            <div class="actions">
              <button type="button" class="btn" onClick=${() => setEditing(false)}>Cancel</button>
              <button type="button" class="btn primary" data-testid="shadow-save" disabled=${busy} onClick=${save}>Save</button>
            </div>`
          : html`<pre class="json" data-testid="shadow-desired">${JSON.stringify(s.desired, null, 2)}</pre>`}
        ${Object.keys(s.delta || {}).length > 0 && html`<p class="hint">Not yet applied by the device: <code>${Object.keys(s.delta).join(", ")}</code></p>`}
      </div>
    </div>`}</${Async}>
  </section>`;
}

// ---------------------------------------------------------------- commands

function Commands({ id, commandRef }) {
  const res = useApi(can("commands.read") ? `/devices/${enc(id)}/commands?limit=${COMMANDS_PAGE}` : null);
  const [name, setName] = useState("");
  const [params, setParams] = useState("{}");
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const live = useRef(new Map());
  commandRef.current = (ev) => {
    if (!res.data) return;
    if (live.current.size >= LIVE_STATES_MAX) live.current.clear();
    live.current.set(ev.command_id, newer(ev.state, live.current.get(ev.command_id)));
    if (res.data.commands.some((c) => c.id === ev.command_id)) {
      res.update((d) => ({ ...d, commands: d.commands.map((c) => (c.id === ev.command_id ? { ...c, state: newer(c.state, ev.state) } : c)) }));
      // A final state has a result the event does not carry.
      if (rank(ev.state) === 3) res.reload();
    } else res.reload();
  };
  if (!can("commands.read")) return null;
  const send = async (e) => {
    e.preventDefault();
    const [p, err] = parseJson(params);
    if (err) return setError("Parameters " + err);
    if (!name.trim()) return setError("Enter a command name.");
    setBusy(true);
    setError(null);
    try {
      const c = await api("POST", `/devices/${enc(id)}/commands`, { name: name.trim(), params: p });
      toast(`Command ${c.name} queued`);
      // An event may have brought it in already (with a newer state than this answer's).
      res.update((d) => (d.commands.some((x) => x.id === c.id) ? d : { ...d, commands: [c, ...d.commands] }));
    } catch (e2) {
      setError(e2.message);
    } finally {
      setBusy(false);
    }
  };
  const older = async () => {
    try {
      const more = await api("GET", `/devices/${enc(id)}/commands` + qs({ limit: COMMANDS_PAGE, cursor: res.data.next_cursor }));
      const seen = new Set(res.data.commands.map((c) => c.id));
      res.setData({ commands: [...res.data.commands, ...more.commands.filter((c) => !seen.has(c.id))], next_cursor: more.next_cursor });
    } catch (e2) {
      toast("Could not load older commands: " + e2.message, "error");
    }
  };
  const cancel = async (c) => {
    try {
      const n = await api("POST", `/devices/${enc(id)}/commands/${enc(c.id)}/cancel`);
      res.setData({ ...res.data, commands: res.data.commands.map((x) => (x.id === n.id ? n : x)) });
    } catch (e2) {
      toast("Cancel failed: " + e2.message, "error");
    }
  };
  return html`<section class="card">
    <h2>Commands</h2>
    ${can("commands.write") && html`<form class="command-form" onSubmit=${send}>
      <label>Name<input data-testid="command-name" value=${name} onInput=${(e) => setName(e.target.value)} placeholder="reboot" required /></label>
      <label>Parameters (JSON)<textarea data-testid="command-params" class="mono" rows="2" value=${params} onInput=${(e) => setParams(e.target.value)}></textarea></label>
      <button type="submit" class="btn primary" data-testid="command-send" disabled=${busy}>Send command</button>
      ${error && html`<p class="form-error" role="alert">${error}</p>`}
    </form>`}
    <${Async} res=${res}>${(d) => d.commands.length === 0 ? html`<${Empty}>No commands sent to this device yet.</${Empty}>` : html`<div class="table-wrap"><table class="table">
      <thead><tr><th>Command</th><th>State</th><th>Created</th><th>Result</th><th><span class="sr-only">Actions</span></th></tr></thead>
      <tbody>${d.commands.map((c) => ({ ...c, state: newer(c.state, live.current.get(c.id)) })).map((c) => html`<tr key=${c.id} data-testid="command-row" data-command-id=${c.id} data-state=${c.state}>
        <td data-label="Command"><strong>${c.name}</strong> ${c.origin === "local" && html`<span class="badge" data-testid="command-local" title="Run on the device's local API while it could not reach the server">executed locally</span>`} <code class="muted">${JSON.stringify(c.params)}</code></td>
        <td data-label="State"><${StateBadge} state=${c.state} /></td>
        <td data-label="Created">${fmtTime(c.created_at)}${c.synced_at && html`<br /><span class="muted" data-testid="command-synced">device time; synced ${fmtTime(c.synced_at)}</span>`}</td>
        <td data-label="Result">${c.result ? html`<code>${c.result.status} ${JSON.stringify(c.result.output)}</code>` : html`<span class="muted">–</span>`}</td>
        <td>${CANCELLABLE.has(c.state) && can("commands.write") && html`<button type="button" class="btn small" data-testid="command-cancel" onClick=${() => cancel(c)}>Cancel</button>`}</td>
      </tr>`)}</tbody></table></div>
      ${d.next_cursor && html`<div class="pager"><button type="button" class="btn small" data-testid="commands-older" onClick=${older}>Show older commands</button></div>`}`}</${Async}>
  </section>`;
}

// ---------------------------------------------------------------- page

export default function Device({ params }) {
  const id = params.id;
  const dev = useApi(`/devices/${enc(id)}`);
  const [online, setOnline] = useState(null);
  const [confirmDelete, setConfirmDelete] = useState(false);
  const live = useRef(() => {});
  const shadow = useRef(() => {});
  const command = useRef(() => {});
  const pipeline = useRef(() => {});
  useEffect(() => setOnline(null), [id]);

  useEvents("id:" + id, (kind, ev) => {
    if (ev.device_id !== id) return;
    if (kind === "telemetry") {
      live.current(ev);
      pipeline.current();
    }
    else if (kind === "presence") {
      setOnline(!!ev.online);
      pipeline.current();
    }
    else if (kind === "shadow") shadow.current(ev);
    else if (kind === "command") command.current(ev);
    else if (kind === "reset") dev.reload();
  });

  const del = async () => {
    try {
      await api("DELETE", `/devices/${enc(id)}`);
      toast(`Device ${id} deleted`);
      navigate("#/devices");
    } catch (e) {
      toast("Delete failed: " + e.message, "error");
      setConfirmDelete(false);
    }
  };

  return html`
    <div class="crumbs"><a href="#/devices">← Devices</a></div>
    <${PageTitle} title=${id}><span data-testid="device-title">${id}</span></${PageTitle}>
    <${Async} res=${dev} label="Loading the device…">${(d) => html`
      <div class="grid2 detail-top">
        <${Info} device=${d} online=${online ?? d.online} onReload=${dev.reload} />
        <${Shadow} id=${id} shadowRef=${shadow} />
      </div>
      <${Gateway} key=${id} id=${id} />
      <${Provisioning} id=${id} reloadRef=${pipeline} />
      <${Telemetry} id=${id} liveRef=${live} />
      <${Commands} id=${id} commandRef=${command} />
      <${Updates} id=${id} />
      <${Health} id=${id} />
      ${can("devices.write") && html`<section class="card danger-zone">
        <h2>Delete</h2>
        <p>Deleting removes the device, its telemetry and commands; its certificate stops working.</p>
        <button type="button" class="btn danger" data-testid="device-delete" onClick=${() => setConfirmDelete(true)}>Delete device</button>
      </section>`}
    `}</${Async}>
    ${confirmDelete && html`<${Confirm} title="Delete device" text=${`Delete device ${id}? This cannot be undone.`} okLabel="Delete" danger onOk=${del} onCancel=${() => setConfirmDelete(false)} />`}
  `;
}

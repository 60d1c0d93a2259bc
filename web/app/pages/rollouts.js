// #/rollouts: the rollouts (issue 19), newest first, with paging: state, version, target, the
// current wave, committed of total, failed; #/rollouts/<id>: one rollout: its state and reason,
// each wave (the control cohort last) with its progress and devices per update state, waiting
// and deferred, the health window, the gate's comparison per signal (updated devices against the
// control cohort), the event log, and Pause / Resume / Abort. Live from the rollout's event
// stream (GET /api/v1/rollouts/<id>/stream, with the session cookie like the events page); if
// the stream is refused, polled every 2 s while the rollout runs or is paused. docs/ota.md
// "Rollouts".
import { html, useState, useEffect, useRef, api, qs, useApi, useInterval, can, toast, Empty, Async, Dialog, PageTitle, StateBadge, fmtTime, fmtAgo, fmtNum } from "../lib.js";
import { STATES as OTA_STATES } from "./ota.js";

const enc = encodeURIComponent;
const PAGE_SIZE = 50;
/** How often the list reloads while the page is open. */
const RELOAD_MS = 5000;
/** How often an open rollout is polled when its event stream cannot be used. */
const POLL_MS = 2000;
/** States a rollout never leaves. */
const OVER = new Set(["completed", "aborted"]);
const LIVE = new Set(["running", "paused"]);

const fmtPct = (p) => `${Number(p.toFixed(2))}%`;

/** "wave 1 (50%)", or "control" for the control cohort. */
function waveLabel(w) {
  if (!w) return "–";
  if (w.control) return "control";
  return `wave ${w.wave + 1}${w.pct === null || w.pct === undefined ? "" : ` (${fmtPct(w.pct)})`}`;
}

/** The wave a rollout is at (its `wave` index; the last entry is the control cohort). */
function currentWave(r) {
  return r.waves.find((w) => w.wave === r.wave) || r.waves[r.wave];
}

/** Devices of a wave whose update ended: committed, failed or rolled back. */
function doneOf(w) {
  const s = w.states || {};
  return (s.committed || 0) + (s.failed || 0) + (s.rolled_back || 0);
}

function fmtRate(rate) {
  return rate === null || rate === undefined ? "–" : rate.toFixed(2);
}

/** The updated devices' rate over the control's: "∞×" when the control saw none and the
 *  updated devices some. */
function fmtRatio(s) {
  if (s.kind === "metric") {
    return s.effect === null || s.effect === undefined ? "–" : `r = ${s.effect >= 0 ? "+" : ""}${s.effect.toFixed(2)}`;
  }
  if (s.ratio === null || s.ratio === undefined) return s.updated.events > 0 ? "∞×" : "–";
  return `${s.ratio.toFixed(2)}×`;
}

function fmtP(p) {
  if (p === null || p === undefined) return "–";
  return p < 0.001 ? "<0.001" : p.toFixed(3);
}

function Rollouts() {
  const [cursors, setCursors] = useState([null]);
  const [ix, setIx] = useState(0);
  const res = useApi("/rollouts" + qs({ limit: PAGE_SIZE, cursor: cursors[ix] }));
  useInterval(() => res.reload(), RELOAD_MS);
  const next = () => {
    const c = res.data && res.data.next_cursor;
    if (!c) return;
    setCursors([...cursors.slice(0, ix + 1), c]);
    setIx(ix + 1);
  };
  return html`
    <${PageTitle} sub="Updates sent in waves, each started only when the devices already updated are as healthy as a control cohort kept on the old version.">Rollouts</${PageTitle}>
    <section class="card" data-testid="rollouts">
      <div class="toolbar"><h2>Rollouts</h2></div>
      <p class="muted">Start one with <code>mooring rollout create --artifact art_... --target tag:site=berlin</code> (docs/ota.md).</p>
      <${Async} res=${res} label="Loading rollouts…">${(d) => d.rollouts.length === 0 ? html`<${Empty}>No rollouts yet.</${Empty}>` : html`<div class="table-wrap"><table class="table">
        <thead><tr><th>Rollout</th><th>State</th><th>Version</th><th>Target</th><th>Wave</th><th>Committed</th><th>Failed</th><th>Created</th></tr></thead>
        <tbody>${d.rollouts.map((r) => html`<tr key=${r.id} data-testid="rollout-row" data-rollout-id=${r.id} data-state=${r.state}>
          <td data-label="Rollout"><a href=${"#/rollouts/" + enc(r.id)} class="mono" data-testid="rollout-link">${r.id}</a>${r.rollback_of ? html`<div class="muted">rolls back <span class="mono">${r.rollback_of}</span></div>` : ""}</td>
          <td data-label="State"><${StateBadge} state=${r.state} /></td>
          <td data-label="Version">${r.version}</td>
          <td data-label="Target"><code>${r.selector}</code></td>
          <td data-label="Wave" data-testid="rollout-row-wave">${waveLabel(currentWave(r))}</td>
          <td data-label="Committed" data-testid="rollout-row-committed">${fmtNum(r.committed)}/${fmtNum(r.total)}</td>
          <td data-label="Failed" title=${`${r.failed} failed, ${r.rolled_back} rolled back`}>${fmtNum(r.failed)}${r.rolled_back ? html` <span class="muted">+${fmtNum(r.rolled_back)} rolled back</span>` : ""}</td>
          <td data-label="Created" title=${fmtTime(r.created_at)}>${fmtAgo(r.created_at)}<div class="muted">${r.created_by}</div></td>
        </tr>`)}</tbody></table></div>`}</${Async}>
      <nav class="pager" aria-label="Pages">
        <button type="button" class="btn" data-testid="prev-page" disabled=${ix === 0} onClick=${() => setIx(ix - 1)}>← Newer</button>
        <span>Page ${ix + 1}</span>
        <button type="button" class="btn" data-testid="next-page" disabled=${!(res.data && res.data.next_cursor)} onClick=${next}>Older →</button>
      </nav>
    </section>
  `;
}

/** Follows a rollout while `live`: its event stream (`event: rollout`, the Rollout JSON) calls
 *  `onRollout`; if the stream is refused (too many streams, signed out), `poll` runs every 2 s
 *  instead. The stream closes when the rollout is over or the page is left. */
function useRolloutLive(id, live, onRollout, poll) {
  const ref = useRef(onRollout);
  ref.current = onRollout;
  const [polling, setPolling] = useState(false);
  useEffect(() => {
    if (!live || polling) return;
    const es = new EventSource(`/api/v1/rollouts/${enc(id)}/stream`);
    const onFrame = (e) => {
      let r = null;
      try {
        r = JSON.parse(e.data);
      } catch (_) {
        return;
      }
      // The server ends the stream after a final state; closing first keeps the browser from
      // connecting again.
      if (OVER.has(r.state)) es.close();
      ref.current(r);
    };
    // A refused stream (an HTTP error) is closed for good; a dropped one reconnects by itself.
    const onError = () => {
      if (es.readyState === EventSource.CLOSED) setPolling(true);
    };
    es.addEventListener("rollout", onFrame);
    es.addEventListener("error", onError);
    return () => {
      es.removeEventListener("rollout", onFrame);
      es.removeEventListener("error", onError);
      es.close();
    };
  }, [id, live, polling]);
  useInterval(poll, POLL_MS, live && polling);
}

function Abort({ r, busy, onAbort, onClose }) {
  const [rollback, setRollback] = useState(false);
  const [reason, setReason] = useState("");
  const submit = (e) => {
    e.preventDefault();
    const body = { rollback };
    if (reason.trim()) body.reason = reason.trim();
    onAbort(body);
  };
  return html`<${Dialog} title="Abort rollout" onClose=${onClose} testid="rollout-abort-dialog">
    <form onSubmit=${submit}>
      <p class="confirm-text">Abort ${r.id}? Its deployment is canceled: updates not picked up yet are withdrawn, and devices that started are told to stop before they install.</p>
      <label>Reason (optional, for the event log)<input data-testid="rollout-abort-reason" value=${reason} onInput=${(e) => setReason(e.target.value)} /></label>
      <label class="inline"><input type="checkbox" data-testid="rollout-abort-rollback" checked=${rollback} onChange=${(e) => setRollback(e.target.checked)} /> Roll back the devices that committed (${fmtNum(r.committed)}), to the version each ran before</label>
      <div class="actions">
        <button type="button" class="btn" data-testid="rollout-abort-cancel" onClick=${onClose} autofocus>Cancel</button>
        <button type="submit" class="btn danger" data-testid="rollout-abort-confirm" disabled=${busy}>Abort rollout</button>
      </div>
    </form>
  </${Dialog}>`;
}

/** A wave's started devices per update state, in pipeline order, then waiting and deferred. */
function WaveCounts({ w }) {
  const states = OTA_STATES.filter(([s]) => (w.states || {})[s]);
  return html`<ul class="chips rollout-counts">
    ${states.map(([s, l]) => html`<li class=${"chip ota-" + s} data-testid="rollout-wave-count" data-state=${s}>${l} <strong>${fmtNum(w.states[s])}</strong></li>`)}
    ${w.waiting > 0 && html`<li class="chip" data-testid="rollout-wave-count" data-state="waiting">Waiting <strong>${fmtNum(w.waiting)}</strong>${w.deferred > 0 ? html`, <span data-testid="rollout-wave-deferred">${fmtNum(w.deferred)} deferred</span>` : ""}</li>`}
    ${states.length === 0 && w.waiting === 0 && html`<li class="muted">no device</li>`}
  </ul>`;
}

function Waves({ r }) {
  return html`<section class="card" data-testid="rollout-waves">
    <h2>Waves</h2>
    <div class="table-wrap"><table class="table rollout-waves">
      <thead><tr><th>Wave</th><th>Progress</th><th>Devices</th></tr></thead>
      <tbody>${r.waves.map((w) => {
        const done = doneOf(w);
        const current = w.wave === r.wave && !OVER.has(r.state);
        return html`<tr key=${w.wave} data-testid="rollout-wave" data-wave=${w.wave} data-control=${String(w.control)} data-current=${String(current)}
            data-total=${w.total} data-done=${done} data-waiting=${w.waiting} data-deferred=${w.deferred} class=${current ? "current" : ""}>
          <td data-label="Wave"><strong data-testid="rollout-wave-label">${waveLabel(w)}</strong>${current ? html` <span class="badge s-running">now</span>` : ""}</td>
          <td data-label="Progress"><progress max=${w.total || 1} value=${done} aria-label=${`${waveLabel(w)}: ${done} of ${w.total} ended`}></progress><div class="muted">${fmtNum(done)}/${fmtNum(w.total)} ended</div></td>
          <td data-label="Devices"><${WaveCounts} w=${w} /></td>
        </tr>`;
      })}</tbody>
    </table></div>
  </section>`;
}

function GateSide({ c, metric, testid }) {
  if (metric) {
    const mean = c.mean === null || c.mean === undefined ? "–" : c.mean.toFixed(3);
    return html`<span data-testid=${testid} data-mean=${c.mean ?? ""} data-devices=${c.devices}>mean ${mean} on ${fmtNum(c.devices)} devices <span class="muted">(${fmtNum(c.events)} points)</span></span>`;
  }
  return html`<span data-testid=${testid} data-events=${c.events} data-devices=${c.devices}>${fmtNum(c.events)} on ${fmtNum(c.devices)} devices <span class="muted">(${fmtRate(c.rate)}/device-h)</span></span>`;
}

function GateTable({ r }) {
  const g = r.gate;
  return html`<section class="card" data-testid="rollout-gate">
    <h2>Health gate</h2>
    ${r.window_ends_at && html`<p data-testid="rollout-window">Health window of ${waveLabel(currentWave(r))}: ${r.window_started_at ? html`since <span title=${fmtTime(r.window_started_at)}>${fmtAgo(r.window_started_at)}</span>, ` : ""}ends ${fmtTime(r.window_ends_at)}.</p>`}
    ${!g ? html`<${Empty}>No comparison yet: the gate compares a wave's updated devices with the control cohort once its health window is over.</${Empty}>` : html`
      <p data-testid="rollout-gate-verdict" data-verdict=${g.verdict}>After ${waveLabel(r.waves.find((w) => w.wave === g.wave) || { wave: g.wave })}: <${StateBadge} state=${g.verdict} /> <span class="muted">checked ${fmtTime(g.checked_at)}; a signal fails at ${g.margin}× the control's rate (a metric: a rank-biserial r of 0.3 the bad way) with p ≤ ${g.alpha}</span></p>
      ${g.signals.length === 0 ? html`<${Empty}>Nothing compared: the rollout has no control cohort, so only its abort threshold guards it.</${Empty}>` : html`<div class="table-wrap"><table class="table">
        <thead><tr><th>Signal</th><th>Updated</th><th>Control</th><th>Ratio</th><th>p</th><th>Result</th></tr></thead>
        <tbody>${g.signals.map((s) => html`<tr key=${s.signal} data-testid="rollout-gate-signal" data-signal=${s.signal} data-verdict=${s.verdict}>
          <td data-label="Signal"><code>${s.signal}</code></td>
          <td data-label="Updated"><${GateSide} c=${s.updated} metric=${s.kind === "metric"} testid="rollout-gate-updated" /></td>
          <td data-label="Control"><${GateSide} c=${s.control} metric=${s.kind === "metric"} testid="rollout-gate-control" /></td>
          <td data-label="Ratio" data-testid="rollout-gate-ratio">${fmtRatio(s)}</td>
          <td data-label="p" data-testid="rollout-gate-p">${fmtP(s.p_value)}</td>
          <td data-label="Result"><${StateBadge} state=${s.verdict} />${s.reason ? html`<div class="muted">${s.reason}</div>` : ""}</td>
        </tr>`)}</tbody></table></div>`}
    `}
  </section>`;
}

function Events({ res }) {
  return html`<section class="card" data-testid="rollout-events">
    <h2>Event log</h2>
    <${Async} res=${res} label="Loading the event log…">${(d) => d.events.length === 0 ? html`<${Empty}>No events.</${Empty}>` : html`<div class="table-wrap"><table class="table">
      <thead><tr><th>#</th><th>At</th><th>By</th><th>Event</th><th>Detail</th></tr></thead>
      <tbody>${d.events.map((e) => html`<tr key=${e.seq} data-testid="rollout-event" data-seq=${e.seq} data-kind=${e.kind}>
        <td data-label="#">${e.seq}</td>
        <td data-label="At" title=${fmtAgo(e.at)}>${fmtTime(e.at)}</td>
        <td data-label="By" data-testid="rollout-event-by">${e.by}</td>
        <td data-label="Event"><code>${e.kind}</code></td>
        <td data-label="Detail">${e.detail}</td>
      </tr>`)}</tbody></table></div>`}</${Async}>
  </section>`;
}

function Rollout({ id }) {
  const res = useApi(`/rollouts/${enc(id)}`);
  const events = useApi(`/rollouts/${enc(id)}/events`);
  const [busy, setBusy] = useState(false);
  const [aborting, setAborting] = useState(false);
  const r = res.data;
  const live = !!r && LIVE.has(r.state);
  useRolloutLive(id, live, (next) => res.setData(next), () => res.reload());
  // The event log follows the rollout: reloaded whenever it changed.
  const changed = r ? `${r.updated_at}/${r.state}` : "";
  const first = useRef(true);
  useEffect(() => {
    if (!changed) return;
    if (first.current) {
      first.current = false;
      return;
    }
    events.reload();
  }, [changed]);
  const write = can("devices.write");
  const act = async (what, body) => {
    setBusy(true);
    try {
      const next = await api("POST", `/rollouts/${enc(id)}/${what}`, body);
      res.setData(next);
      events.reload();
      toast(`Rollout ${next.id} ${next.state}`);
      setAborting(false);
    } catch (e) {
      toast(e.message, "error");
    }
    setBusy(false);
  };
  return html`
    <div class="crumbs"><a href="#/rollouts">← Rollouts</a></div>
    <${Async} res=${res} label="Loading the rollout…">${(r) => html`
      <${PageTitle} title=${`Rollout ${r.id}`}><span data-testid="rollout-title">Rollout <span class="mono">${r.id}</span></span></${PageTitle}>
      <section class="card" data-testid="rollout" data-rollout-id=${r.id} data-state=${r.state}>
        <div class="card-head"><h2>${r.version} <span class="muted">to</span> <code>${r.selector}</code></h2>
          ${write && html`
            <button type="button" class="btn" data-testid="rollout-pause" disabled=${busy || r.state !== "running"} onClick=${() => act("pause")}>Pause</button>
            <button type="button" class="btn primary" data-testid="rollout-resume" disabled=${busy || r.state !== "paused"} onClick=${() => act("resume")}>Resume</button>
            <button type="button" class="btn danger" data-testid="rollout-abort" disabled=${busy || !LIVE.has(r.state)} onClick=${() => setAborting(true)}>Abort…</button>`}
        </div>
        <dl class="facts">
          <dt>State</dt><dd data-testid="rollout-state"><${StateBadge} state=${r.state} />${r.reason ? html` <span data-testid="rollout-reason">${r.reason}</span>` : ""}</dd>
          <dt>Version</dt><dd>${r.version} <code class="muted">${r.artifact_id}</code>${r.spec && r.spec.allow_downgrade ? html` <span class="badge">downgrade</span>` : ""}</dd>
          <dt>Devices</dt><dd data-testid="rollout-devices">${fmtNum(r.total)}: committed ${fmtNum(r.committed)}, failed ${fmtNum(r.failed)}, rolled back ${fmtNum(r.rolled_back)}, updating ${fmtNum(r.in_flight)}, waiting ${fmtNum(r.waiting)} (<span data-testid="rollout-deferred" data-deferred=${r.deferred}>${fmtNum(r.deferred)} deferred</span>)</dd>
          <dt>Wave</dt><dd data-testid="rollout-wave-now">${waveLabel(currentWave(r))} of ${fmtNum(r.waves.filter((w) => !w.control).length)}${r.waves.some((w) => w.control) ? ", then the control cohort" : ""}</dd>
          <dt>Deployment</dt><dd><a href="#/ota" class="mono">${r.deployment_id}</a></dd>
          ${r.rollback_of && html`<dt>Rolls back</dt><dd><a href=${"#/rollouts/" + enc(r.rollback_of)} class="mono">${r.rollback_of}</a></dd>`}
          ${r.spec && html`<dt>Plan</dt><dd class="muted">control ${fmtPct(r.spec.control_pct ?? 5)}, waves ${(r.spec.waves || []).map(fmtPct).join(", ")}; aborts above ${fmtPct(r.spec.abort_failure_rate_pct ?? 5)} failed once ${fmtNum(r.spec.min_devices ?? 20)} devices ended${r.spec.require && r.spec.require.length ? `; requires ${r.spec.require.join(", ")}` : ""}${r.spec.window ? `; window ${r.spec.window}` : ""}${r.spec.auto_abort ? "; aborts and rolls back when the gate fails" : ""}</dd>`}
          <dt>Created</dt><dd title=${fmtTime(r.created_at)}>${fmtAgo(r.created_at)} by ${r.created_by}</dd>
        </dl>
      </section>
      <${Waves} r=${r} />
      <${GateTable} r=${r} />
      <${Events} res=${events} />
      ${aborting && html`<${Abort} r=${r} busy=${busy} onAbort=${(body) => act("abort", body)} onClose=${() => setAborting(false)} />`}
    `}</${Async}>
  `;
}

export default function RolloutsPage({ params }) {
  return params.id ? html`<${Rollout} id=${params.id} />` : html`<${Rollouts} />`;
}

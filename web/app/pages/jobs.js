// #/jobs: the work queue: every job (bulk actions, rotations, reports) with its progress, worker,
// attempts and last error; a state filter (dead: the dead letter list); cancel; a new telemetry
// report and its download once done. docs/jobs.md, docs/reports.md.
import { html, useState, api, useApi, useInterval, can, toast, Empty, Async, Dialog, PageTitle, fmtTime, fmtAgo } from "../lib.js";

const enc = encodeURIComponent;
const STATES = [
  ["", "All"],
  ["queued", "Queued"],
  ["running", "Running"],
  ["succeeded", "Succeeded"],
  ["failed", "Failed"],
  ["canceled", "Canceled"],
  ["dead", "Dead (out of attempts)"],
];
const RANGES = [
  ["3600000", "Last hour"],
  ["86400000", "Last 24 hours"],
  ["604800000", "Last 7 days"],
  ["2592000000", "Last 30 days"],
];
/** How often the list reloads while the page is open. */
const RELOAD_MS = 2000;
const FINAL = ["succeeded", "failed", "canceled", "dead"];

function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

function NewReport({ onCreated, onClose }) {
  const [kind, setKind] = useState("telemetry");
  const [groupBy, setGroupBy] = useState("");
  const [selector, setSelector] = useState("");
  const [range, setRange] = useState("86400000");
  const [format, setFormat] = useState("csv");
  const [metrics, setMetrics] = useState("");
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e) => {
    e.preventDefault();
    setError(null);
    setBusy(true);
    try {
      let body;
      if (kind === "fleet") {
        body = { kind, selector: selector.trim(), format: format === "jsonl" ? "html" : format };
        if (groupBy.trim()) body.group_by = groupBy.trim();
      } else {
        const to_ms = Date.now();
        body = { kind, selector: selector.trim(), from_ms: to_ms - Number(range), to_ms, format: format === "html" ? "csv" : format };
        const names = metrics.split(",").map((m) => m.trim()).filter(Boolean);
        if (names.length) body.metrics = names;
      }
      const job = await api("POST", "/reports", body);
      toast(`Report ${job.id} queued`);
      onCreated();
      onClose();
    } catch (err) {
      setError(err.message);
    } finally {
      setBusy(false);
    }
  };
  const fleet = kind === "fleet";
  return html`<${Dialog} title="New report" onClose=${onClose} testid="report-dialog">
    <form onSubmit=${submit}>
      <label>Kind<select data-testid="report-kind" value=${kind} onChange=${(e) => { setKind(e.target.value); setFormat(e.target.value === "fleet" ? "html" : "csv"); }}><option value="telemetry">Telemetry (points of the devices)</option><option value="fleet">Fleet (health per cohort, versions, alerts)</option></select></label>
      <label>Devices (selector${fleet ? ", optional" : ""})<input required=${!fleet} class="mono" data-testid="report-selector" value=${selector} onInput=${(e) => setSelector(e.target.value)} autofocus placeholder="tag:site=berlin" /></label>
      ${fleet
        ? html`<label>Cohorts (group by, optional)<input class="mono" data-testid="report-group-by" value=${groupBy} onInput=${(e) => setGroupBy(e.target.value)} placeholder="tag:site,version" /></label>
          <label>Format<select data-testid="report-format" value=${format} onChange=${(e) => setFormat(e.target.value)}><option value="html">HTML page</option><option value="csv">CSV (cohort table)</option></select></label>`
        : html`<label>Range<select data-testid="report-range" value=${range} onChange=${(e) => setRange(e.target.value)}>${RANGES.map(([v, l]) => html`<option value=${v}>${l}</option>`)}</select></label>
          <label>Format<select data-testid="report-format" value=${format} onChange=${(e) => setFormat(e.target.value)}><option value="csv">CSV</option><option value="jsonl">JSON lines</option></select></label>
          <label>Metrics (comma-separated, optional)<input class="mono" data-testid="report-metrics" value=${metrics} onInput=${(e) => setMetrics(e.target.value)} placeholder="battery, temp" /></label>`}
      <p class="hint">The report runs in the background as a job; download it here once it has succeeded.</p>
      ${error && html`<p class="form-error mono" data-testid="report-error" role="alert">${error}</p>`}
      <div class="actions"><button type="button" class="btn" onClick=${onClose}>Cancel</button><button type="submit" class="btn primary" data-testid="report-submit" disabled=${busy}>Queue report</button></div>
    </form>
  </${Dialog}>`;
}

function progress(j) {
  const total = j.total == null ? "?" : j.total;
  let p = `${j.done}/${total}`;
  if (j.failed) p += `, ${j.failed} failed`;
  if (j.result) p += `, ${j.result.points} points`;
  return p;
}

export default function JobsPage() {
  const [state, setState] = useState("");
  const [creating, setCreating] = useState(false);
  const res = useApi(`/jobs?limit=200${state ? "&state=" + state : ""}`, [state]);
  useInterval(() => res.reload(), RELOAD_MS);
  const write = can("devices.write");
  const report = can("telemetry.read");
  const cancel = async (j) => {
    try {
      await api("POST", `/jobs/${enc(j.id)}/cancel`);
      res.reload();
    } catch (e) {
      toast(e.message, "error");
    }
  };
  return html`
    <${PageTitle} sub="Bulk actions, certificate rotations and reports, run in the background by the work queue.">Jobs</${PageTitle}>
    <section class="card" data-testid="jobs">
      <div class="toolbar"><h2>Jobs</h2><span class="spacer"></span>
        <label class="inline">Show <select data-testid="job-state" value=${state} onChange=${(e) => setState(e.target.value)}>${STATES.map(([v, l]) => html`<option value=${v}>${l}</option>`)}</select></label>
        ${report && html`<button type="button" class="btn primary" data-testid="report-create" onClick=${() => setCreating(true)}>New report</button>`}
      </div>
      <${Async} res=${res}>${(d) => d.jobs.length === 0 ? html`<${Empty}>No jobs${state ? " in this state" : ""}.</${Empty}>` : html`<div class="table-wrap"><table class="table">
        <thead><tr><th>Job</th><th>Action</th><th>State</th><th>Progress</th><th>Devices</th><th>Created</th><th>Worker</th><th><span class="sr-only">Actions</span></th></tr></thead>
        <tbody>${d.jobs.map((j) => html`<tr key=${j.id} data-testid="job-row" data-job-id=${j.id} data-state=${j.state} data-action=${j.action}>
          <td data-label="Job" class="mono">${j.id}</td>
          <td data-label="Action">${j.action}</td>
          <td data-label="State"><span class=${"badge " + (j.state === "succeeded" ? "on" : "")}>${j.state}</span>${j.last_error ? html`<div class="muted mono" title=${`${j.attempts} failed attempts in a row`}>${j.last_error}</div>` : ""}${j.errors.length ? html`<div class="muted">${j.errors[0].device_id ? j.errors[0].device_id + ": " : ""}${j.errors[0].message}</div>` : ""}</td>
          <td data-label="Progress" data-testid="job-progress">${progress(j)}</td>
          <td data-label="Devices"><code>${j.selector}</code></td>
          <td data-label="Created" title=${fmtTime(j.created_ms)}>${fmtAgo(j.created_ms)}<div class="muted">${j.created_by}</div></td>
          <td data-label="Worker">${j.worker || html`<span class="muted">-</span>`}${j.attempts ? html`<div class="muted">attempt ${j.attempts} failed</div>` : ""}</td>
          <td class="row-actions">
            ${j.result && j.state === "succeeded" && html`<a class="btn small" data-testid="job-download" href=${`/api/v1/jobs/${enc(j.id)}/result`} download>Download (${fmtBytes(j.result.bytes)})</a>`}
            ${write && !FINAL.includes(j.state) && html`<button type="button" class="btn small danger" data-testid="job-cancel" onClick=${() => cancel(j)}>Cancel</button>`}
          </td>
        </tr>`)}</tbody></table></div>`}</${Async}>
    </section>
    ${creating && html`<${NewReport} onClose=${() => setCreating(false)} onCreated=${() => res.reload()} />`}
  `;
}

// #/alerts: the alerts rules raised (open ones by default; acknowledge, resolve) and the rules
// themselves (create with the server's error shown as it is, enable, disable, delete).
// docs/health.md "Rules" and "Alerts".
import { html, useState, api, useApi, useInterval, can, toast, Empty, Async, Dialog, Confirm, PageTitle, fmtTime, fmtAgo } from "../lib.js";

const enc = encodeURIComponent;
const STATES = [
  ["open", "Open"],
  ["firing", "Firing"],
  ["acknowledged", "Acknowledged"],
  ["resolved", "Resolved"],
  ["", "All"],
];
/** How often the alerts reload while the page is open. */
const RELOAD_MS = 3000;

function CreateRule({ onCreated, onClose }) {
  const [name, setName] = useState("");
  const [when, setWhen] = useState("");
  const [selector, setSelector] = useState("");
  const [then, setThen] = useState("alert:warning");
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e) => {
    e.preventDefault();
    setError(null);
    setBusy(true);
    try {
      const body = { name: name.trim(), when, then };
      if (selector.trim()) body.selector = selector.trim();
      const r = await api("POST", "/rules", body);
      toast(`Rule ${r.name} created`);
      onCreated();
      onClose();
    } catch (err) {
      setError(err.message);
    } finally {
      setBusy(false);
    }
  };
  return html`<${Dialog} title="New rule" onClose=${onClose} testid="rule-dialog">
    <form onSubmit=${submit}>
      <label>Name<input required data-testid="rule-name" value=${name} onInput=${(e) => setName(e.target.value)} autofocus placeholder="low-battery" /></label>
      <label>When<input required class="mono" data-testid="rule-when" value=${when} onInput=${(e) => setWhen(e.target.value)} placeholder="battery < 15 for 10m" /></label>
      <label>Devices (selector, optional)<input class="mono" data-testid="rule-selector" value=${selector} onInput=${(e) => setSelector(e.target.value)} placeholder="tag:hw=rev-b" /></label>
      <label>Then<input required class="mono" data-testid="rule-then" value=${then} onInput=${(e) => setThen(e.target.value)} placeholder="alert:warning,command:diagnostics" /></label>
      <p class="hint">Conditions: <code>metric op number [for 10m]</code>, <code>rate(metric, 1h) op number</code>, <code>no telemetry for 30m</code>, <code>on update_rolled_back</code>, <code>count(disconnected, 1h) > 3</code>. Actions: <code>alert:info|warning|critical</code>, <code>command:NAME</code>, <code>tag:KEY=VALUE</code>.</p>
      ${error && html`<p class="form-error mono" data-testid="rule-error" role="alert">${error}</p>`}
      <div class="actions"><button type="button" class="btn" onClick=${onClose}>Cancel</button><button type="submit" class="btn primary" data-testid="rule-submit" disabled=${busy}>Create rule</button></div>
    </form>
  </${Dialog}>`;
}

function Rules() {
  const res = useApi("/rules");
  const [creating, setCreating] = useState(false);
  const [deleting, setDeleting] = useState(null);
  const write = can("devices.write");
  const setEnabled = async (r, enabled) => {
    try {
      await api("PATCH", `/rules/${enc(r.id)}`, { enabled });
      res.reload();
    } catch (e) {
      toast(e.message, "error");
    }
  };
  const del = async (r) => {
    try {
      await api("DELETE", `/rules/${enc(r.id)}`);
      toast(`Rule ${r.name} deleted`);
      res.reload();
    } catch (e) {
      toast(e.message, "error");
    }
    setDeleting(null);
  };
  return html`<section class="card" data-testid="rules">
    <div class="toolbar"><h2>Rules</h2><span class="spacer"></span>
      ${write && html`<button type="button" class="btn primary" data-testid="rule-create" onClick=${() => setCreating(true)}>New rule</button>`}
    </div>
    <${Async} res=${res}>${(d) => d.rules.length === 0 ? html`<${Empty}>No rules yet.</${Empty}>` : html`<div class="table-wrap"><table class="table">
      <thead><tr><th>Name</th><th>When</th><th>Devices</th><th>Then</th><th>Status</th><th><span class="sr-only">Actions</span></th></tr></thead>
      <tbody>${d.rules.map((r) => html`<tr key=${r.id} data-testid="rule-row" data-rule-id=${r.id} data-name=${r.name} data-status=${r.status}>
        <td data-label="Name"><strong>${r.name}</strong></td>
        <td data-label="When"><code>${r.when}</code></td>
        <td data-label="Devices">${r.selector ? html`<code>${r.selector}</code>` : html`<span class="muted">all</span>`}${r.scope ? html` <span class="muted">within <code>${r.scope}</code></span>` : ""}</td>
        <td data-label="Then"><code>${r.then}</code></td>
        <td data-label="Status"><span class=${"badge " + (r.status === "active" ? "on" : "")} title=${r.status_reason || ""}>${r.status}</span>${r.status_reason ? html`<div class="muted">${r.status_reason}</div>` : ""}</td>
        <td class="row-actions">${write && html`
          ${r.enabled
            ? html`<button type="button" class="btn small" data-testid="rule-disable" onClick=${() => setEnabled(r, false)}>Disable</button>`
            : html`<button type="button" class="btn small" data-testid="rule-enable" onClick=${() => setEnabled(r, true)}>Enable</button>`}
          <button type="button" class="btn small danger" data-testid="rule-delete" onClick=${() => setDeleting(r)}>Delete</button>`}</td>
      </tr>`)}</tbody></table></div>`}</${Async}>
    ${creating && html`<${CreateRule} onClose=${() => setCreating(false)} onCreated=${() => res.reload()} />`}
    ${deleting && html`<${Confirm} title="Delete rule" text=${`Delete the rule ${deleting.name}? Its open alerts are resolved.`} okLabel="Delete" danger onOk=${() => del(deleting)} onCancel=${() => setDeleting(null)} />`}
  </section>`;
}

function Alerts() {
  const [state, setState] = useState("open");
  const res = useApi(`/alerts?limit=200${state ? "&state=" + state : ""}`, [state]);
  useInterval(() => res.reload(), RELOAD_MS);
  const write = can("devices.write");
  const act = async (a, verb) => {
    try {
      await api("POST", `/alerts/${enc(a.id)}/${verb}`);
      res.reload();
    } catch (e) {
      toast(e.message, "error");
    }
  };
  return html`<section class="card" data-testid="alerts">
    <div class="toolbar"><h2>Alerts</h2><span class="spacer"></span>
      <label class="inline">Show <select data-testid="alert-state" value=${state} onChange=${(e) => setState(e.target.value)}>${STATES.map(([v, l]) => html`<option value=${v}>${l}</option>`)}</select></label>
    </div>
    <${Async} res=${res}>${(d) => d.alerts.length === 0 ? html`<${Empty}>No alerts.</${Empty}>` : html`<div class="table-wrap"><table class="table">
      <thead><tr><th>Severity</th><th>State</th><th>Rule</th><th>Device</th><th>Count</th><th>Last fired</th><th>Detail</th><th><span class="sr-only">Actions</span></th></tr></thead>
      <tbody>${d.alerts.map((a) => html`<tr key=${a.id} data-testid="alert-row" data-alert-id=${a.id} data-state=${a.state} data-device-id=${a.device_id || ""}>
        <td data-label="Severity"><span class=${"badge sev-" + a.severity}>${a.severity}</span></td>
        <td data-label="State">${a.state}${a.acknowledged_by ? html`<div class="muted">by ${a.acknowledged_by}</div>` : ""}${a.resolved_by ? html`<div class="muted">by ${a.resolved_by}</div>` : ""}</td>
        <td data-label="Rule">${a.rule_name}</td>
        <td data-label="Device">${a.device_id ? html`<a href=${"#/devices/" + enc(a.device_id)}>${a.device_id}</a>` : "-"}</td>
        <td data-label="Count">${a.count}</td>
        <td data-label="Last fired" title=${fmtTime(a.last_fired_at)}>${fmtAgo(a.last_fired_at)}</td>
        <td data-label="Detail" class="mono">${a.detail}</td>
        <td class="row-actions">${write && a.state !== "resolved" && html`
          ${a.state === "firing" && html`<button type="button" class="btn small" data-testid="alert-ack" onClick=${() => act(a, "acknowledge")}>Acknowledge</button>`}
          <button type="button" class="btn small" data-testid="alert-resolve" onClick=${() => act(a, "resolve")}>Resolve</button>`}</td>
      </tr>`)}</tbody></table></div>`}</${Async}>
  </section>`;
}

export default function AlertsPage() {
  return html`
    <${PageTitle} sub="What the rules found, and the rules.">Alerts</${PageTitle}>
    <${Alerts} />
    <${Rules} />
  `;
}

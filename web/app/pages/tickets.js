// #/tickets: the field-service tickets playbooks open (open ones by default; closed or all, in the
// URL as ?state=), newest first, with paging; #/tickets/<id>: one ticket: what raised it, the
// devices to visit (site, the signal's value, installation, parts), the parts to bring, what
// the playbook did, and Close. docs/health.md "Playbooks" and "Tickets".
import { html, useState, useEffect, api, qs, useApi, useInterval, can, navigate, toast, Empty, Async, PageTitle, StateBadge, fmtTime, fmtAgo, fmtNum } from "../lib.js";

const enc = encodeURIComponent;
const STATES = [
  ["open", "Open"],
  ["closed", "Closed"],
  ["all", "All"],
];
const PAGE_SIZE = 50;
/** How often the list and an open ticket reload while the page is open. */
const RELOAD_MS = 5000;

/** `{part: devices}` as one line: "battery pack ×3, wireless repeater ×1". */
function partsLine(parts) {
  return Object.entries(parts || {}).map(([p, n]) => `${p} ×${fmtNum(n)}`).join(", ");
}

function Tickets({ query }) {
  const state = query.get("state") || "open";
  const [cursors, setCursors] = useState([null]);
  const [ix, setIx] = useState(0);
  useEffect(() => {
    setCursors([null]);
    setIx(0);
  }, [state]);
  const res = useApi("/tickets" + qs({ state: state === "all" ? "" : state, limit: PAGE_SIZE, cursor: cursors[ix] }));
  useInterval(() => res.reload(), RELOAD_MS);
  const next = () => {
    const c = res.data && res.data.next_cursor;
    if (!c) return;
    setCursors([...cursors.slice(0, ix + 1), c]);
    setIx(ix + 1);
  };
  const pick = (v) => navigate("#/tickets" + (v === "open" ? "" : "?state=" + enc(v)), true);
  return html`
    <${PageTitle} sub="What playbooks found for a person to do on site: the devices to visit and the parts to bring.">Tickets</${PageTitle}>
    <section class="card" data-testid="tickets">
      <div class="toolbar"><h2>Tickets</h2><span class="spacer"></span>
        <label class="inline">Show <select data-testid="ticket-state" value=${state} onChange=${(e) => pick(e.target.value)}>${STATES.map(([v, l]) => html`<option value=${v}>${l}</option>`)}</select></label>
      </div>
      <${Async} res=${res}>${(d) => d.tickets.length === 0 ? html`<${Empty}>No tickets${state === "all" ? "" : " in this state"}.</${Empty}>` : html`<div class="table-wrap"><table class="table">
        <thead><tr><th>Ticket</th><th>Playbook</th><th>Devices</th><th>Parts</th><th>Opened</th><th>State</th></tr></thead>
        <tbody>${d.tickets.map((t) => html`<tr key=${t.id} data-testid="ticket-row" data-ticket-id=${t.id} data-state=${t.state}>
          <td data-label="Ticket"><a href=${"#/tickets/" + enc(t.id)} data-testid="ticket-link">${t.title}</a><div class="muted mono">${t.id}</div></td>
          <td data-label="Playbook">${t.playbook}</td>
          <td data-label="Devices" title=${`${t.devices.length} listed, ${t.devices_affected} affected of ${t.devices_total}`}>${fmtNum(t.devices.length)}/${fmtNum(t.devices_total)}</td>
          <td data-label="Parts">${partsLine(t.parts) || html`<span class="muted">-</span>`}</td>
          <td data-label="Opened" title=${fmtTime(t.created_at)}>${fmtAgo(t.created_at)}</td>
          <td data-label="State"><${StateBadge} state=${t.state} />${t.closed_by ? html`<div class="muted">by ${t.closed_by}</div>` : ""}</td>
        </tr>`)}</tbody></table></div>`}</${Async}>
      <nav class="pager" aria-label="Pages">
        <button type="button" class="btn" data-testid="prev-page" disabled=${ix === 0} onClick=${() => setIx(ix - 1)}>← Newer</button>
        <span>Page ${ix + 1}</span>
        <button type="button" class="btn" data-testid="next-page" disabled=${!(res.data && res.data.next_cursor)} onClick=${next}>Older →</button>
      </nav>
    </section>
  `;
}

function Installation({ i }) {
  if (!i) return html`<span class="muted">not recorded</span>`;
  return html`<span title=${fmtTime(i.at)}>${i.location} <span class="muted">by ${i.by}</span></span>${i.notes ? html`<div class="muted">${i.notes}</div>` : ""}`;
}

function Ticket({ id }) {
  const res = useApi(`/tickets/${enc(id)}`);
  const [busy, setBusy] = useState(false);
  const open = res.data && res.data.state === "open";
  useInterval(() => res.reload(), RELOAD_MS, open);
  const write = can("devices.write");
  const close = async () => {
    setBusy(true);
    try {
      const t = await api("POST", `/tickets/${enc(id)}/close`);
      res.setData(t);
      toast(`Ticket ${t.id} closed`);
    } catch (e) {
      toast(e.message, "error");
    }
    setBusy(false);
  };
  return html`
    <div class="crumbs"><a href="#/tickets">← Tickets</a></div>
    <${Async} res=${res} label="Loading the ticket…">${(t) => html`
      <${PageTitle} title=${t.title}><span data-testid="ticket-title">${t.title}</span></${PageTitle}>
      <section class="card" data-testid="ticket" data-ticket-id=${t.id} data-state=${t.state}>
        <div class="card-head"><h2>Ticket</h2>
          ${write && t.state === "open" && html`<button type="button" class="btn primary" data-testid="ticket-close" disabled=${busy} onClick=${close}>Close</button>`}
        </div>
        <dl class="facts">
          <dt>Id</dt><dd class="mono">${t.id}</dd>
          <dt>State</dt><dd data-testid="ticket-state-value"><${StateBadge} state=${t.state} />${t.closed_at ? html` <span class="muted" title=${fmtTime(t.closed_at)}>${fmtAgo(t.closed_at)}${t.closed_by ? " by " + t.closed_by : ""}</span>` : ""}</dd>
          <dt>Playbook</dt><dd>${t.playbook}</dd>
          <dt>Alert</dt><dd>${t.alert_id ? html`<span class="mono" data-testid="ticket-alert">${t.alert_id}</span>` : html`<span class="muted">none (a rule's job: action)</span>`}</dd>
          <dt>Opened</dt><dd title=${fmtTime(t.created_at)}>${fmtAgo(t.created_at)}</dd>
          ${t.signal && html`<dt>Signal</dt><dd><code>${t.signal}</code></dd>`}
          ${t.cohort && html`<dt>Cohort</dt><dd><code>${t.cohort}</code></dd>`}
          <dt>Devices</dt><dd>${fmtNum(t.devices.length)} listed, ${fmtNum(t.devices_affected)} affected of ${fmtNum(t.devices_total)}</dd>
          <dt>Parts</dt><dd data-testid="ticket-parts">${partsLine(t.parts) || html`<span class="muted">none</span>`}</dd>
        </dl>
      </section>
      <section class="card" data-testid="ticket-devices">
        <h2>Devices to visit</h2>
        ${t.devices.length === 0 ? html`<${Empty}>No devices listed.</${Empty}>` : html`<div class="table-wrap"><table class="table">
          <thead><tr><th>Device</th><th>Site</th><th>${t.signal || "Value"}</th><th>Installed</th><th>Parts</th></tr></thead>
          <tbody>${t.devices.map((d) => html`<tr key=${d.device_id} data-testid="ticket-device-row" data-device-id=${d.device_id}>
            <td data-label="Device"><a href=${"#/devices/" + enc(d.device_id)} class="mono">${d.device_id}</a></td>
            <td data-label="Site">${d.site || html`<span class="muted">-</span>`}</td>
            <td data-label=${t.signal || "Value"}>${fmtNum(d.value)}</td>
            <td data-label="Installed"><${Installation} i=${d.installation} /></td>
            <td data-label="Parts">${d.parts.length ? d.parts.join(", ") : html`<span class="muted">-</span>`}</td>
          </tr>`)}</tbody></table></div>`}
      </section>
      <section class="card" data-testid="ticket-steps">
        <h2>What the playbook did</h2>
        <ol>${t.steps.map((s, i) => html`<li key=${i}>${s}</li>`)}</ol>
      </section>
    `}</${Async}>
  `;
}

export default function TicketsPage({ params, query }) {
  return params.id ? html`<${Ticket} id=${params.id} />` : html`<${Tickets} query=${query} />`;
}

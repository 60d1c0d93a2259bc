// #/audit: every write through the API (and each refusal), newest first, with filters and paging.
import { html, useState, useApi, qs, Empty, Async, PageTitle, fmtTime } from "../lib.js";

const PAGE_SIZE = 50;

export default function Audit() {
  const [form, setForm] = useState({ actor: "", action: "", target: "" });
  const [filters, setFilters] = useState(form);
  const [cursors, setCursors] = useState([null]);
  const [ix, setIx] = useState(0);
  const res = useApi("/audit" + qs({ ...filters, limit: PAGE_SIZE, cursor: cursors[ix] }));
  const apply = (e) => {
    e.preventDefault();
    setFilters({ ...form });
    setCursors([null]);
    setIx(0);
  };
  const next = () => {
    const c = res.data && res.data.next_cursor;
    if (!c) return;
    setCursors([...cursors.slice(0, ix + 1), c]);
    setIx(ix + 1);
  };
  const field = (k, label, ph) => html`<label>${label}<input value=${form[k]} placeholder=${ph} data-testid=${"audit-" + k} onInput=${(e) => setForm({ ...form, [k]: e.target.value })} /></label>`;
  return html`
    <${PageTitle} sub="Who changed what, and what was refused. Newest first.">Audit log</${PageTitle}>
    <form class="filters" onSubmit=${apply}>
      ${field("actor", "Actor", "a@example.com")}
      ${field("action", "Action", "device.delete")}
      ${field("target", "Target", "lock-1")}
      <button type="submit" class="btn">Filter</button>
    </form>
    <${Async} res=${res}>${(d) => d.entries.length === 0 ? html`<${Empty}>No entries${filters.actor || filters.action || filters.target ? " match these filters" : ""}.</${Empty}>` : html`<div class="table-wrap"><table class="table">
      <thead><tr><th>When</th><th>Actor</th><th>Action</th><th>Target</th><th>Status</th><th>Source</th><th>Detail</th></tr></thead>
      <tbody>${d.entries.map((a) => html`<tr key=${a.id} data-testid="audit-row">
        <td data-label="When">${fmtTime(a.at)}</td>
        <td data-label="Actor">${a.actor}</td>
        <td data-label="Action"><code>${a.action}</code></td>
        <td data-label="Target" class="mono">${a.target}</td>
        <td data-label="Status"><span class=${"badge " + (a.status < 400 ? "on" : "off")}>${a.status}</span></td>
        <td data-label="Source">${a.source}<span class="muted"> · ${a.node}</span></td>
        <td data-label="Detail">${a.detail}</td>
      </tr>`)}</tbody></table></div>`}</${Async}>
    <nav class="pager" aria-label="Pages">
      <button type="button" class="btn" data-testid="prev-page" disabled=${ix === 0} onClick=${() => setIx(ix - 1)}>← Newer</button>
      <span>Page ${ix + 1}</span>
      <button type="button" class="btn" data-testid="next-page" disabled=${!(res.data && res.data.next_cursor)} onClick=${next}>Older →</button>
    </nav>
  `;
}

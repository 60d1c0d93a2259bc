// #/devices?selector=...: find devices by selector (server-side paging and counts), select them
// by hand, by page or every one matching the filter, and run bulk actions as jobs (POST /jobs)
// with a confirmation naming the count and a progress bar.
import {
  html, useState, useEffect, useMemo, useRef, api, qs, useApi, useDebounced, useInterval, useEvents, navigate,
  can, toast, Loading, Empty, ErrorBox, Dialog, PageTitle, OnlineBadge, fmtNum, fmtAgo,
  plural, parseJson, currentRoute,
} from "../lib.js";

const PAGE_SIZE = 50;
/** Most ids in a hand-made selection (the selector's id list bound). */
const HAND_SELECTION_MAX = 1000;
const JOB_POLL_MS = 1000;
const FINAL = new Set(["succeeded", "failed", "canceled"]);

function hasTerm(selector, term) {
  return selector.split(/\s+and\s+/).map((t) => t.trim()).includes(term);
}

function toggleTerm(selector, term) {
  const terms = selector.split(/\s+and\s+/).map((t) => t.trim()).filter(Boolean);
  const i = terms.indexOf(term);
  if (i >= 0) terms.splice(i, 1);
  else terms.push(term);
  return terms.join(" and ");
}

function Chips({ selector, summary, devices, onPick }) {
  const chips = [{ term: "online", label: "online" }];
  // Tags seen on this page (the fleet summary counts versions, not tags).
  const tags = new Map();
  for (const d of devices || []) {
    for (const [k, v] of Object.entries(d.tags || {})) {
      const t = `tag:${k}=${v}`;
      tags.set(t, (tags.get(t) || 0) + 1);
    }
  }
  [...tags.entries()].sort((a, b) => b[1] - a[1]).slice(0, 8).forEach(([t]) => chips.push({ term: t, label: t.slice(4) }));
  for (const v of (summary && summary.versions) || []) {
    if (v.version && chips.length < 16) chips.push({ term: "version=" + v.version, label: "v" + v.version });
  }
  return html`<div class="chips" role="group" aria-label="Quick filters">
    ${chips.map((c) => {
      const on = hasTerm(selector, c.term);
      return html`<button type="button" key=${c.term} class=${"chip" + (on ? " on" : "")} aria-pressed=${on} onClick=${() => onPick(toggleTerm(selector, c.term))}>${c.label}</button>`;
    })}
  </div>`;
}

function JobProgress({ job, onCancel, onDismiss }) {
  const total = job.total ?? 0;
  const pct = total ? Math.round((100 * (job.done + job.failed)) / total) : FINAL.has(job.state) ? 100 : 0;
  return html`<div class=${"job card s-" + job.state} data-testid="job-progress" data-job-id=${job.id} data-state=${job.state} data-done=${job.done} data-total=${job.total ?? ""} role="status" aria-live="polite">
    <div class="job-head">
      <strong>${job.action} · ${job.state}</strong>
      <span>${fmtNum(job.done)} done${job.failed ? `, ${fmtNum(job.failed)} failed` : ""} of ${job.total === null ? "…" : fmtNum(job.total)}</span>
      ${!FINAL.has(job.state) && can("devices.write") && html`<button type="button" class="btn small" onClick=${onCancel}>Cancel job</button>`}
      ${FINAL.has(job.state) && html`<button type="button" class="btn small ghost" onClick=${onDismiss}>Dismiss</button>`}
    </div>
    <progress max="100" value=${pct} aria-label="Job progress">${pct}%</progress>
    ${job.errors && job.errors.length > 0 && html`<details><summary>${plural(job.errors.length, "error")}</summary>
      <ul>${job.errors.map((e) => html`<li key=${e.device_id}><code>${e.device_id}</code>: ${e.message}</li>`)}</ul></details>`}
  </div>`;
}

/** One dialog per bulk action: what to do (tags, command), the count it applies to ("Tag 37
 *  devices with k=v"), and Confirm; then the job starts. */
function BulkFlow({ action, count, selector, onDone, onClose }) {
  const [key, setKey] = useState("");
  const [value, setValue] = useState("");
  const [name, setName] = useState("");
  const [params, setParams] = useState("{}");
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);

  const body = () => {
    if (action === "tag") return { selector, action, tags: { [key.trim()]: value.trim() } };
    if (action === "untag") return { selector, action, keys: [key.trim()] };
    if (action === "command") return { selector, action, command: { name: name.trim(), params: parseJson(params)[0] } };
    return { selector, action };
  };
  const run = async (e) => {
    e.preventDefault();
    setError(null);
    if ((action === "tag" || action === "untag") && !key.trim()) return setError("Enter a tag key.");
    if (action === "command") {
      if (!name.trim()) return setError("Enter a command name.");
      const [, err] = parseJson(params);
      if (err) return setError("Parameters " + err);
    }
    setBusy(true);
    try {
      onDone(await api("POST", "/jobs", body()));
    } catch (err) {
      setBusy(false);
      setError(err.message);
    }
  };
  const n = plural(count, "device");
  const what = {
    tag: `Tag ${n}` + (key.trim() ? ` with ${key.trim()}=${value.trim()}` : ""),
    untag: `Remove tag ${key.trim() || "…"} from ${n}`,
    command: `Send ${name.trim() || "a command"} to ${n}`,
    delete: `Delete ${n}`,
  }[action];
  const titles = { tag: "Tag devices", untag: "Remove a tag", command: "Send a command", delete: "Delete devices" };
  const danger = action === "delete";
  return html`<${Dialog} title=${titles[action]} onClose=${onClose} testid="confirm-dialog">
    <form onSubmit=${run}>
      ${action === "tag" && html`<div class="row2">
        <label>Key<input data-testid="bulk-tag-key" value=${key} onInput=${(e) => setKey(e.target.value)} required autofocus /></label>
        <label>Value<input data-testid="bulk-tag-value" value=${value} onInput=${(e) => setValue(e.target.value)} /></label>
      </div>`}
      ${action === "untag" && html`<label>Tag key to remove<input data-testid="bulk-untag-key" value=${key} onInput=${(e) => setKey(e.target.value)} required autofocus /></label>`}
      ${action === "command" && html`
        <label>Command name<input data-testid="bulk-command-name" value=${name} onInput=${(e) => setName(e.target.value)} required autofocus placeholder="reboot" /></label>
        <label>Parameters (JSON object)<textarea data-testid="bulk-command-params" rows="4" class="mono" value=${params} onInput=${(e) => setParams(e.target.value)}></textarea></label>`}
      <p class="confirm-text" aria-live="polite"><strong>${what}</strong>${danger ? ". Their certificates stop working; this cannot be undone." : "."}</p>
      ${error && html`<p class="form-error" role="alert">${error}</p>`}
      <div class="actions">
        <button type="button" class="btn" data-testid="confirm-cancel" onClick=${onClose} autofocus=${danger}>Cancel</button>
        <button type="submit" class=${"btn " + (danger ? "danger" : "primary")} data-testid="confirm-ok" disabled=${busy}>${{ tag: "Tag", untag: "Untag", command: "Send to", delete: "Delete" }[action] + " " + n}</button>
      </div>
    </form>
  </${Dialog}>`;
}

export default function Devices({ query }) {
  const selector = query.get("selector") || "";
  const [text, setText] = useState(selector);
  const typed = useDebounced(text, 300);
  const [cursors, setCursors] = useState([null]); // cursor of each page visited
  const [pageIx, setPageIx] = useState(0);
  const [picked, setPicked] = useState(new Set());
  const [allMatching, setAllMatching] = useState(false);
  const [flow, setFlow] = useState(null);
  const [job, setJob] = useState(null);
  const lastApplied = useRef(selector);

  // The URL is the truth; typing applies after a pause (or Enter).
  const apply = (sel) => {
    const s = sel.trim();
    lastApplied.current = s;
    if (s !== selector) navigate("#/devices" + (s ? "?selector=" + encodeURIComponent(s) : ""), true);
  };
  useEffect(() => {
    if (typed.trim() !== lastApplied.current) apply(typed);
  }, [typed]);
  useEffect(() => {
    // A new selector (typed, chip, back button): first page, no selection.
    if (selector !== text.trim()) setText(selector);
    lastApplied.current = selector;
    setCursors([null]);
    setPageIx(0);
    setPicked(new Set());
    setAllMatching(false);
  }, [selector]);

  const cursor = cursors[pageIx];
  const list = useApi("/devices" + qs({ selector, limit: PAGE_SIZE, cursor }));
  const summary = useApi("/fleet/summary" + qs({ selector }));
  const devices = list.data ? list.data.devices : [];
  const total = summary.data ? summary.data.devices : null;

  useEffect(() => {
    if (list.data && list.data.next_cursor && cursors.length === pageIx + 1) {
      setCursors([...cursors, list.data.next_cursor]);
    }
  }, [list.data]);
  const lastPage = total !== null && (pageIx + 1) * PAGE_SIZE >= total;
  const hasNext = !!(list.data && list.data.next_cursor) && !lastPage;

  // Job progress polling.
  useInterval(async () => {
    try {
      const j = await api("GET", "/jobs/" + encodeURIComponent(job.id));
      setJob(j);
      if (FINAL.has(j.state)) {
        toast(`Job ${j.action}: ${j.state}, ${fmtNum(j.done)} done${j.failed ? ", " + fmtNum(j.failed) + " failed" : ""}`);
        list.reload();
        summary.reload();
      }
    } catch (e) {
      toast("Could not read the job: " + e.message, "error");
      setJob({ ...job, state: "failed" });
    }
  }, JOB_POLL_MS, !!job && !FINAL.has(job.state));

  const pageIds = devices.map((d) => d.id);
  // Online badges follow presence events for the devices on this page.
  useEvents(pageIds.join(","), (kind, ev) => {
    if (kind !== "presence" || !list.data) return;
    const i = list.data.devices.findIndex((d) => d.id === ev.device_id);
    if (i < 0 || list.data.devices[i].online === !!ev.online) return;
    const copy = [...list.data.devices];
    copy[i] = { ...copy[i], online: !!ev.online, last_seen: ev.at };
    list.setData({ ...list.data, devices: copy });
  }, pageIds.length > 0);
  const pageAllPicked = pageIds.length > 0 && pageIds.every((id) => picked.has(id));
  const selCount = allMatching ? total ?? 0 : picked.size;
  const bulkSelector = allMatching ? selector : [...picked].join(",");

  const pick = (id, on) => {
    setAllMatching(false);
    const next = new Set(picked);
    if (on) {
      if (next.size >= HAND_SELECTION_MAX) return toast(`At most ${fmtNum(HAND_SELECTION_MAX)} devices by hand: filter and select all matching instead.`, "error");
      next.add(id);
    } else next.delete(id);
    setPicked(next);
  };
  const pickPage = (on) => {
    setAllMatching(false);
    const next = new Set(picked);
    for (const id of pageIds) on ? next.add(id) : next.delete(id);
    if (next.size > HAND_SELECTION_MAX) return toast(`At most ${fmtNum(HAND_SELECTION_MAX)} devices by hand: filter and select all matching instead.`, "error");
    setPicked(next);
  };
  const clearSel = () => {
    setPicked(new Set());
    setAllMatching(false);
  };

  const canWrite = can("devices.write");
  const canCommand = canWrite && can("commands.write");
  const started = (j) => {
    setFlow(null);
    setJob(j);
    clearSel();
    toast(`Job started: ${j.action}`);
    if (FINAL.has(j.state)) {
      list.reload();
      summary.reload();
    }
  };
  const cancelJob = async () => {
    try {
      setJob(await api("POST", `/jobs/${encodeURIComponent(job.id)}/cancel`));
    } catch (e) {
      toast("Cancel failed: " + e.message, "error");
    }
  };

  const bulkButton = (action, label, testid, allowed, danger) =>
    allowed && html`<button type="button" class=${"btn" + (danger ? " danger" : "")} data-testid=${testid} disabled=${selCount === 0} onClick=${() => setFlow(action)}>${label}</button>`;

  return html`
    <${PageTitle}>Devices</${PageTitle}>
    <div class="toolbar">
      <form class="filter" role="search" onSubmit=${(e) => { e.preventDefault(); apply(text); }}>
        <label class="sr-only" for="device-filter">Filter by selector</label>
        <input id="device-filter" type="search" data-testid="device-filter" class="mono" placeholder="tag:site=berlin and online" value=${text}
          onInput=${(e) => setText(e.target.value)} autocomplete="off" spellcheck="false" />
        <button type="submit" class="btn">Filter</button>
      </form>
      <span class="count" data-testid="device-count" aria-live="polite">${total === null ? (summary.error ? "count unavailable" : "counting…") : plural(total, "device")}</span>
    </div>
    <${Chips} selector=${selector} summary=${summary.data} devices=${devices} onPick=${(s) => { setText(s); apply(s); }} />
    <p class="hint">Selector: <code>online</code>, <code>tag:key=value</code>, <code>version=1.2.0</code>, ids <code>d1,d2</code>, joined by <code>and</code>. See docs/commands.md.</p>
    ${summary.error && summary.error.code !== "invalid_selector" && !list.error && html`<p class="hint" role="status">The count is unavailable: ${summary.error.message}</p>`}

    ${canWrite && html`<div class="selection-bar" role="region" aria-label="Selection and bulk actions">
      <span data-testid="selection-count">${selCount === 0 ? "No devices selected" : plural(selCount, "device") + " selected" + (allMatching ? " (all matching)" : "")}</span>
      <button type="button" class="btn small" data-testid="select-all-matching" disabled=${!selector || !total || allMatching}
        title=${selector ? "" : "Filter first: a bulk action runs on a selector"}
        onClick=${() => { setPicked(new Set()); setAllMatching(true); }}>Select all ${total === null ? "" : fmtNum(total)} matching</button>
      ${selCount > 0 && html`<button type="button" class="btn small ghost" onClick=${clearSel}>Clear</button>`}
      <span class="spacer"></span>
      ${bulkButton("tag", "Tag…", "bulk-tag", canWrite)}
      ${bulkButton("untag", "Untag…", "bulk-untag", canWrite)}
      ${bulkButton("command", "Command…", "bulk-command", canCommand)}
      ${bulkButton("delete", "Delete…", "bulk-delete", canWrite, true)}
    </div>`}
    ${job && html`<${JobProgress} job=${job} onCancel=${cancelJob} onDismiss=${() => setJob(null)} />`}

    ${list.error ? html`<${ErrorBox} error=${list.error} retry=${list.reload} />`
      : list.loading && !list.data ? html`<${Loading} label="Loading devices…" />`
      : devices.length === 0 ? html`<${Empty}>${selector ? "No device matches this filter." : "No devices yet. Register one with mooring device create."}</${Empty}>`
      : html`<div class="table-wrap">
        <table class="table devices-table">
          <thead><tr>
            ${canWrite && html`<th class="check"><input type="checkbox" data-testid="select-page" aria-label="Select every device on this page" checked=${pageAllPicked || allMatching} disabled=${allMatching} onChange=${(e) => pickPage(e.target.checked)} /></th>`}
            <th>Device</th><th>State</th><th>Last seen</th><th>Tags</th>
          </tr></thead>
          <tbody>
            ${devices.map((d) => html`<tr key=${d.id} data-testid="device-row" data-device-id=${d.id}>
              ${canWrite && html`<td class="check"><input type="checkbox" data-testid="device-select" aria-label=${"Select " + d.id} checked=${allMatching || picked.has(d.id)} disabled=${allMatching} onChange=${(e) => pick(d.id, e.target.checked)} /></td>`}
              <td data-label="Device"><a href=${"#/devices/" + encodeURIComponent(d.id)} class="mono">${d.id}</a></td>
              <td data-label="State"><${OnlineBadge} online=${d.online} /></td>
              <td data-label="Last seen" title=${d.last_seen ? new Date(d.last_seen).toISOString() : ""}>${d.online ? "now" : fmtAgo(d.last_seen)}</td>
              <td data-label="Tags"><div class="tags">${Object.entries(d.tags || {}).map(([k, v]) => html`<span class="tag" key=${k}>${k}=${v}</span>`)}</div></td>
            </tr>`)}
          </tbody>
        </table>
      </div>`}
    <nav class="pager" aria-label="Pages">
      <button type="button" class="btn" data-testid="prev-page" disabled=${pageIx === 0} onClick=${() => setPageIx(pageIx - 1)}>← Previous</button>
      <span>Page ${pageIx + 1}${total !== null ? " of " + Math.max(1, Math.ceil(total / PAGE_SIZE)) : ""}</span>
      <button type="button" class="btn" data-testid="next-page" disabled=${!hasNext} onClick=${() => setPageIx(pageIx + 1)}>Next →</button>
    </nav>
    ${flow && html`<${BulkFlow} action=${flow} count=${selCount} selector=${bulkSelector} onDone=${started} onClose=${() => setFlow(null)} />`}
  `;
}

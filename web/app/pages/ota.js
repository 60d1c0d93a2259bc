// #/ota: over-the-air updates (issue 17): the artifacts (version, size, hardware, state; delete),
// the deployments with their devices counted per update state (live while one runs; cancel),
// and a form to deploy an artifact to a selector. Uploading stays with the CLI
// (`mooring ota upload`): it signs and streams large files.
import { html, useState, useEffect, useRef, qs, api, useApi, useInterval, can, toast, Empty, Async, Dialog, Confirm, PageTitle, fmtTime, fmtNum } from "../lib.js";

const enc = encodeURIComponent;
/** The update states in pipeline order (mooring-proto ota::UpdateState), with their colours. */
export const STATES = [
  ["pending", "Pending"],
  ["deferred", "Deferred"],
  ["downloading", "Downloading"],
  ["verifying", "Verifying"],
  ["installing", "Installing"],
  ["rebooting", "Rebooting"],
  ["health_checking", "Health check"],
  ["committed", "Committed"],
  ["rolled_back", "Rolled back"],
  ["failed", "Failed"],
];
const FINAL = new Set(["committed", "rolled_back", "failed"]);

export function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

/** How many of a deployment's devices are still on their way (not in a final state). */
function inFlight(d) {
  return Object.entries(d.counts || {}).reduce((n, [s, c]) => (FINAL.has(s) ? n : n + c), 0);
}

function Deploy({ artifacts, onDone, onClose }) {
  const ready = artifacts.filter((a) => a.state === "ready");
  const [artifact, setArtifact] = useState(ready[0]?.id || "");
  const [selector, setSelector] = useState("");
  const [downgrade, setDowngrade] = useState(false);
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e) => {
    e.preventDefault();
    setError(null);
    setBusy(true);
    try {
      const d = await api("POST", "/ota/deployments", { artifact_id: artifact, selector: selector.trim(), allow_downgrade: downgrade });
      toast(`Deployment ${d.id}: ${d.version} to ${fmtNum(d.total)} devices`);
      onDone();
      onClose();
    } catch (err) {
      setError(err.message);
    }
    setBusy(false);
  };
  return html`<${Dialog} title="Deploy an artifact" onClose=${onClose} testid="deploy-dialog">
    <form onSubmit=${submit}>
      <label>Artifact<select data-testid="deploy-artifact" value=${artifact} onChange=${(e) => setArtifact(e.target.value)}>
        ${ready.map((a) => html`<option value=${a.id}>${a.version} (${a.compatible.join(", ")}) ${a.id}</option>`)}
      </select></label>
      <label>Devices (selector)<input required class="mono" data-testid="deploy-selector" placeholder="tag:hw=rev-b and tag:site=berlin" value=${selector} onInput=${(e) => setSelector(e.target.value)} /></label>
      <label class="inline"><input type="checkbox" checked=${downgrade} onChange=${(e) => setDowngrade(e.target.checked)} /> Allow a downgrade</label>
      <p class="hint">Each matching device gets the update as a command: it waits for devices that are offline and runs only when the device's own checks (battery, busy, maintenance window) allow.</p>
      ${error && html`<p class="form-error" role="alert">${error}</p>`}
      <div class="actions"><button type="button" class="btn" onClick=${onClose}>Cancel</button><button type="submit" class="btn primary" data-testid="deploy-submit" disabled=${busy || !artifact}>Deploy</button></div>
    </form>
  </${Dialog}>`;
}

/** A deployment's devices per state: a stacked bar and the counts. */
export function StateCounts({ counts, total }) {
  const shown = STATES.filter(([s]) => (counts || {})[s]);
  return html`<div class="ota-counts">
    <div class="stack" role="img" aria-label=${shown.map(([s, l]) => `${l} ${counts[s]}`).join(", ")}>
      ${shown.map(([s]) => html`<span class=${"seg ota-" + s} style=${`flex-grow:${counts[s]}`}></span>`)}
    </div>
    <ul class="chips">${shown.map(([s, l]) => html`<li class=${"chip ota-" + s} data-testid="deploy-count" data-state=${s}>${l} <strong>${fmtNum(counts[s])}</strong></li>`)}
      ${shown.length === 0 && html`<li class="muted">${fmtNum(total)} devices</li>`}</ul>
  </div>`;
}

// Deployments per page (the API's most).
const DEPLOYMENTS_PAGE = 100;

function Deployments({ reloadRef }) {
  // One cursor per page seen (null: the first); reloads keep the page shown.
  const [cursors, setCursors] = useState([null]);
  const [pageIx, setPageIx] = useState(0);
  const res = useApi("/ota/deployments" + qs({ limit: DEPLOYMENTS_PAGE, cursor: cursors[pageIx] }));
  reloadRef.current = res.reload;
  useEffect(() => {
    if (res.data && res.data.next_cursor && cursors.length === pageIx + 1) {
      setCursors([...cursors, res.data.next_cursor]);
    }
  }, [res.data]);
  const hasNext = !!(res.data && res.data.next_cursor) && cursors.length > pageIx + 1;
  const [canceling, setCanceling] = useState(null);
  const [deleting, setDeleting] = useState(null);
  const live = (res.data?.deployments || []).some((d) => !d.canceled_at && inFlight(d) > 0);
  useInterval(() => res.reload(), 2000, live);
  const cancel = async (d) => {
    try {
      await api("POST", `/ota/deployments/${enc(d.id)}/cancel`, {});
      toast(`Deployment ${d.id} canceled`);
      res.reload();
    } catch (e) {
      toast(e.message, "error");
    }
    setCanceling(null);
  };
  const remove = async (d) => {
    try {
      await api("DELETE", `/ota/deployments/${enc(d.id)}`);
      toast(`Deployment ${d.id} deleted`);
      res.reload();
    } catch (e) {
      toast(e.message, "error");
    }
    setDeleting(null);
  };
  return html`<section class="card" data-testid="deployments">
    <h2>Deployments</h2>
    <${Async} res=${res} label="Loading deployments…">${(d) => d.deployments.length === 0 ? html`<${Empty}>No deployment yet.</${Empty}>` : html`<div class="table-wrap"><table class="table">
      <thead><tr><th>Deployment</th><th>Version</th><th>Devices</th><th>States</th><th>Created</th><th><span class="sr-only">Actions</span></th></tr></thead>
      <tbody>${d.deployments.map((x) => html`<tr key=${x.id} data-testid="deployment-row" data-deployment-id=${x.id} data-canceled=${String(!!x.canceled_at)}>
        <td data-label="Deployment"><code>${x.id}</code><div class="muted mono">${x.selector}</div></td>
        <td data-label="Version">${x.version}${x.allow_downgrade ? html` <span class="badge">downgrade</span>` : ""}</td>
        <td data-label="Devices">${fmtNum(x.total)}</td>
        <td data-label="States"><${StateCounts} counts=${x.counts} total=${x.total} /></td>
        <td data-label="Created">${fmtTime(x.created_at)}<div class="muted">${x.created_by}</div>${x.canceled_at ? html`<div class="badge off">canceled ${fmtTime(x.canceled_at)}</div>` : ""}</td>
        <td class="row-actions">${can("devices.write") && (!x.canceled_at && inFlight(x) > 0
          ? html`<button type="button" class="btn small danger" data-testid="deployment-cancel" onClick=${() => setCanceling(x)}>Cancel</button>`
          : html`<button type="button" class="btn small danger" data-testid="deployment-delete" onClick=${() => setDeleting(x)}>Delete</button>`)}</td>
      </tr>`)}</tbody></table></div>`}</${Async}>
    ${(pageIx > 0 || hasNext) && html`<nav class="pager" aria-label="Deployment pages">
      <button type="button" class="btn small" data-testid="deployments-newer" disabled=${pageIx === 0} onClick=${() => setPageIx(pageIx - 1)}>← Newer</button>
      <button type="button" class="btn small" data-testid="deployments-older" disabled=${!hasNext} onClick=${() => setPageIx(pageIx + 1)}>Older →</button>
    </nav>`}
    ${deleting && html`<${Confirm} title="Delete deployment" text=${`Delete ${deleting.id}? Its devices' update records go with it (their history), and its artifact can then be deleted.`} okLabel="Delete deployment" danger onOk=${() => remove(deleting)} onCancel=${() => setDeleting(null)} />`}
    ${canceling && html`<${Confirm} title="Cancel deployment" text=${`Cancel ${canceling.id}? Devices that have not started it will not; devices installing or rebooting finish what they started (an update is never cut halfway).`} okLabel="Cancel deployment" danger onOk=${() => cancel(canceling)} onCancel=${() => setCanceling(null)} />`}
  </section>`;
}

function Artifacts({ onDeploy }) {
  const res = useApi("/ota/artifacts?limit=200");
  const [deleting, setDeleting] = useState(null);
  const remove = async (a) => {
    try {
      await api("DELETE", `/ota/artifacts/${enc(a.id)}`);
      toast(`Artifact ${a.version} deleted`);
      res.reload();
    } catch (e) {
      toast(e.message, "error");
    }
    setDeleting(null);
  };
  return html`<section class="card" data-testid="artifacts">
    <div class="card-head"><h2>Artifacts</h2>
      ${can("devices.write") && html`<button type="button" class="btn primary" data-testid="deploy-open" disabled=${!res.data?.artifacts.some((a) => a.state === "ready")} onClick=${() => onDeploy(res.data.artifacts)}>Deploy…</button>`}
    </div>
    <p class="muted">Upload with <code>mooring ota upload FILE --version 1.4.0 --compatible rev-b</code>: the server stores it with its SHA-256 and a signed manifest.</p>
    <${Async} res=${res} label="Loading artifacts…">${(d) => d.artifacts.length === 0 ? html`<${Empty}>No artifact uploaded.</${Empty}>` : html`<div class="table-wrap"><table class="table">
      <thead><tr><th>Version</th><th>Hardware</th><th>Size</th><th>State</th><th>Created</th><th><span class="sr-only">Actions</span></th></tr></thead>
      <tbody>${d.artifacts.map((a) => html`<tr key=${a.id} data-testid="artifact-row" data-artifact-id=${a.id} data-state=${a.state}>
        <td data-label="Version"><strong>${a.version}</strong> <code class="muted">${a.id}</code>${a.notes ? html`<div class="muted">${a.notes}</div>` : ""}</td>
        <td data-label="Hardware">${a.compatible.join(", ")}</td>
        <td data-label="Size">${fmtBytes(a.size)}${a.state !== "ready" ? html` <span class="muted">(${fmtBytes(a.stored_bytes)} stored)</span>` : ""}</td>
        <td data-label="State"><span class=${"badge " + (a.state === "ready" ? "on" : "off")}>${a.state}</span></td>
        <td data-label="Created">${fmtTime(a.created_at)}</td>
        <td class="row-actions">${can("devices.write") && html`<button type="button" class="btn small danger" data-testid="artifact-delete" onClick=${() => setDeleting(a)}>Delete</button>`}</td>
      </tr>`)}</tbody></table></div>`}</${Async}>
    ${deleting && html`<${Confirm} title="Delete artifact" text=${`Delete ${deleting.version} (${deleting.id})? Refused while a deployment uses it.`} okLabel="Delete" danger onOk=${() => remove(deleting)} onCancel=${() => setDeleting(null)} />`}
  </section>`;
}

export default function Ota() {
  const [deploying, setDeploying] = useState(null);
  const reloadDeployments = useRef(() => {});
  return html`
    <${PageTitle} sub="Signed artifacts, deployed to devices that install them A/B and report every step.">Updates</${PageTitle}>
    <${Artifacts} onDeploy=${setDeploying} />
    <${Deployments} reloadRef=${reloadDeployments} />
    ${deploying && html`<${Deploy} artifacts=${deploying} onDone=${() => reloadDeployments.current()} onClose=${() => setDeploying(null)} />`}
  `;
}

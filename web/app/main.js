// The shell: the page table, hash routing, the signed-in person, navigation, theme.
// A new page is one module in pages/ (default export: a component taking { params, query })
// plus one row in PAGES below; `perm` hides its nav entry and guards the route, `nav` puts it
// in the navigation.
import {
  html, render, useState, useEffect, useRef, api, session, setMe, currentRoute, navigate,
  can, Toasts, Loading, ErrorBox, toast,
} from "./lib.js";

const PAGES = [
  { path: "login", load: () => import("./pages/login.js"), public: true },
  { path: "set-password", load: () => import("./pages/set-password.js"), public: true },
  { path: "", load: () => import("./pages/overview.js"), perm: "devices.read", active: "overview" },
  { path: "overview", load: () => import("./pages/overview.js"), perm: "devices.read", nav: "Overview" },
  { path: "devices", load: () => import("./pages/devices.js"), perm: "devices.read", nav: "Devices" },
  { path: "devices/:id", load: () => import("./pages/device.js"), perm: "devices.read", active: "devices" },
  { path: "provisioning", load: () => import("./pages/provisioning.js"), perm: "devices.read", nav: "Provisioning" },
  { path: "ota", load: () => import("./pages/ota.js"), perm: "devices.read", nav: "Updates" },
  { path: "rollouts", load: () => import("./pages/rollouts.js"), perm: "devices.read", nav: "Rollouts" },
  { path: "rollouts/:id", load: () => import("./pages/rollouts.js"), perm: "devices.read", active: "rollouts" },
  { path: "alerts", load: () => import("./pages/alerts.js"), perm: "devices.read", nav: "Alerts" },
  { path: "tickets", load: () => import("./pages/tickets.js"), perm: "devices.read", nav: "Tickets" },
  { path: "tickets/:id", load: () => import("./pages/tickets.js"), perm: "devices.read", active: "tickets" },
  { path: "jobs", load: () => import("./pages/jobs.js"), perm: "devices.read", nav: "Jobs" },
  { path: "users", load: () => import("./pages/users.js"), perm: "users.manage", nav: "Users" },
  { path: "tokens", load: () => import("./pages/tokens.js"), perm: "tokens.manage", nav: "Tokens" },
  { path: "audit", load: () => import("./pages/audit.js"), perm: "audit.read", nav: "Audit log" },
];

function match(path) {
  const parts = path.split("/").filter(Boolean);
  for (const page of PAGES) {
    const pat = page.path.split("/").filter(Boolean);
    if (pat.length !== parts.length) continue;
    const params = {};
    let ok = true;
    pat.forEach((p, i) => {
      if (p.startsWith(":")) params[p.slice(1)] = decodeURIComponent(parts[i]);
      else if (p !== parts[i]) ok = false;
    });
    if (ok) return { page, params };
  }
  return null;
}

function useRoute() {
  const [route, setRoute] = useState(currentRoute());
  useEffect(() => {
    const f = () => setRoute(currentRoute());
    window.addEventListener("hashchange", f);
    return () => window.removeEventListener("hashchange", f);
  }, []);
  return route;
}

function useMe() {
  const [me, setLocal] = useState(session.me);
  useEffect(() => {
    session.listeners.add(setLocal);
    return () => session.listeners.delete(setLocal);
  }, []);
  return me;
}

// ---------------------------------------------------------------- theme

function effectiveTheme() {
  const t = document.documentElement.dataset.theme;
  if (t) return t;
  return matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
}

function ThemeToggle() {
  const [theme, setTheme] = useState(effectiveTheme());
  const flip = () => {
    const next = theme === "dark" ? "light" : "dark";
    document.documentElement.dataset.theme = next;
    try {
      localStorage.setItem("mooring-theme", next);
    } catch (_) { /* not persisted */ }
    setTheme(next);
    window.dispatchEvent(new Event("mooring-theme"));
  };
  return html`<button type="button" class="btn ghost" data-testid="theme-toggle" aria-label=${"Switch to " + (theme === "dark" ? "light" : "dark") + " theme"} title="Light or dark" onClick=${flip}>
    ${theme === "dark" ? "☀ Light" : "☾ Dark"}
  </button>`;
}

// ---------------------------------------------------------------- shell

function Nav({ active, me, onNavigate }) {
  return html`<ul class="nav-list">
    ${PAGES.filter((p) => p.nav && (!p.perm || can(p.perm))).map((p) => {
      const key = p.path;
      const current = active === key;
      return html`<li key=${key}><a href=${"#/" + key} data-testid=${"nav-" + key} aria-current=${current ? "page" : undefined} class=${current ? "current" : ""} onClick=${onNavigate}>${p.nav}</a></li>`;
    })}
  </ul>`;
}

function Shell({ me, active, children }) {
  const [open, setOpen] = useState(false);
  const logout = async () => {
    try {
      await api("POST", "/auth/logout", undefined, { noRedirect: true });
    } catch (e) {
      if (e.status !== 401) toast("Logout failed: " + e.message, "error");
    }
    setMe(null);
    navigate("#/login", true);
  };
  return html`<div class="shell">
    <a class="skip" href="#main" onClick=${(e) => { e.preventDefault(); document.getElementById("main").focus(); }}>Skip to content</a>
    <header class="topbar">
      <a class="brand" href="#/overview"><img src="app/icon.svg" alt="" width="24" height="24" /> Mooring</a>
      <nav id="nav" class=${"nav" + (open ? " open" : "")} aria-label="Main">
        <${Nav} active=${active} me=${me} onNavigate=${() => setOpen(false)} />
        <div class="nav-tools">
          <${ThemeToggle} />
          <button type="button" class="btn ghost" data-testid="logout" onClick=${logout}>Log out</button>
        </div>
      </nav>
      <span class="user" data-testid="user-menu" title=${"Signed in as " + me.name + " (" + me.role + ")"}>
        <span class="user-name">${me.name}</span> <span class="badge">${me.role}</span>
      </span>
      <button type="button" class="btn ghost menu-btn" aria-expanded=${open} aria-controls="nav" onClick=${() => setOpen(!open)}>☰ Menu</button>
    </header>
    <main id="main" tabindex="-1">${children}</main>
    <${Toasts} />
  </div>`;
}

function PageHost({ page, params, query }) {
  const [mod, setMod] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    let live = true;
    setError(null);
    page.load().then((m) => live && setMod({ page, m }), (e) => live && setError(e));
    return () => { live = false; };
  }, [page]);
  if (error) return html`<${ErrorBox} error=${{ message: "This page could not be loaded: " + error.message }} />`;
  if (!mod || mod.page !== page) return html`<${Loading} />`;
  const Page = mod.m.default;
  return html`<${Page} params=${params} query=${query} />`;
}

function NotFound() {
  return html`<div class="page-head"><h1 data-testid="page-title">Not found</h1></div>
    <div class="state empty" data-testid="empty">There is no page here. <a href="#/overview">Go to the overview</a>.</div>`;
}

function App() {
  const route = useRoute();
  const me = useMe();
  const [booted, setBooted] = useState(false);
  const [bootError, setBootError] = useState(null);
  const mainRef = useRef(null);

  useEffect(() => {
    api("GET", "/auth/me", undefined, { noRedirect: true })
      .then((m) => setMe(m))
      .catch((e) => { if (e.status !== 401) setBootError(e); })
      .finally(() => setBooted(true));
  }, []);

  const m = match(route.path);
  useEffect(() => {
    // Move focus to the new page's heading so keyboard and screen-reader users start there.
    const h1 = document.querySelector("main h1");
    if (h1 && document.activeElement === document.body) h1.focus({ preventScroll: true });
  }, [route.path]);

  if (!booted) return html`<${Loading} label="Loading Mooring…" />`;
  if (bootError) return html`<div class="bare"><${ErrorBox} error=${bootError} retry=${() => location.reload()} /></div>`;

  if (m && m.page.public) {
    return html`<div class="bare"><${PageHost} page=${m.page} params=${m.params} query=${route.query} /><${Toasts} /></div>`;
  }
  if (!me) {
    // Not signed in: the login page, then back here.
    setTimeout(() => navigate("#/login" + (route.raw ? "?next=" + encodeURIComponent(route.raw) : ""), true), 0);
    return html`<${Loading} />`;
  }
  const active = m ? m.page.active || m.page.path : "";
  let body;
  if (!m) body = html`<${NotFound} />`;
  else if (m.page.perm && !can(m.page.perm)) {
    body = html`<div class="page-head"><h1 data-testid="page-title">Not allowed</h1></div>
      <${ErrorBox} error=${{ status: 403, code: "forbidden", message: `Your role (${me.role}) does not include ${m.page.perm}.` }} />`;
  } else body = html`<${PageHost} key=${m.page.path} page=${m.page} params=${m.params} query=${route.query} />`;
  return html`<${Shell} me=${me} active=${active}>${body}</${Shell}>`;
}

const root = document.getElementById("app");
root.textContent = "";
render(html`<${App} />`, root);

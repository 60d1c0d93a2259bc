// Applies the saved theme before the first paint (a classic script: it runs before the modules).
// "light" or "dark" from the toggle; absent: follow prefers-color-scheme.
(function () {
  try {
    var t = localStorage.getItem("mooring-theme");
    if (t === "light" || t === "dark") document.documentElement.dataset.theme = t;
  } catch (e) { /* storage refused: follow the system */ }
})();

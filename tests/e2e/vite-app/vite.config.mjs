// VITE_ALLOWED_HOSTS: comma-separated host suffixes to allow ("" keeps Vite's default: localhost only).
const allowed = (process.env.VITE_ALLOWED_HOSTS || "").split(",").filter(Boolean);

export default {
  server: { allowedHosts: allowed.length ? allowed : undefined },
  logLevel: "warn",
  clearScreen: false,
};

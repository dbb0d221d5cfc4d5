import { message } from "./message.js";

document.getElementById("msg").textContent = message;

if (import.meta.hot) {
  import.meta.hot.accept("./message.js", (mod) => {
    document.getElementById("msg").textContent = mod.message;
  });
}

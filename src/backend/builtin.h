// Registers the backends compiled into this build: "reference", "cpu" and, in CUDA builds,
// "cuda". Explicit (no static initialisers: static libraries would drop them); idempotent.
#pragma once

namespace redknot {

void register_builtin_backends();

}  // namespace redknot

// The piece table shared by every gather kernel (mirrors PIECE_COLUMNS in hyforget_fast/spec.py).
// Plain C++, no torch headers: included by .cu files too.
#pragma once
#include <cstdint>

namespace hyforget {
enum PieceCol : int { SRC = 0, DST, ROWS, COLS, RPERM, CPERM, NORM, DLEN, NUM_PIECE_COLS };
}  // namespace hyforget

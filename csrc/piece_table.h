// The piece table shared by every gather kernel (mirrors PIECE_COLUMNS in hyforget_fast/ops/spec.py,
// which documents the columns and the ownership rule). Element (r, c) of a piece goes to output
// position DST + r*RS + c*CS. A piece with RS == COLS and CS == 1 is contiguous and owns
// [DST, DST + DLEN) (zero padding after ROWS*COLS); any other piece is strided and owns exactly
// its ROWS*COLS positions. Positions no piece owns are zero. Plain C++, no torch headers:
// included by .cu files too.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define HYFORGET_HD __host__ __device__
#else
#define HYFORGET_HD
#endif

namespace hyforget {
enum PieceCol : int { SRC = 0, DST, ROWS, COLS, RPERM, CPERM, NORM, DLEN, RS, CS, NUM_PIECE_COLS };

// Whether a table row (one piece) is contiguous in the output (the layer-wise layout's pieces).
HYFORGET_HD inline bool piece_contiguous(const int64_t* e) { return e[RS] == e[COLS] && e[CS] == 1; }
}  // namespace hyforget

// The kernels' core without torch, for tests on instruction sets this machine lacks (ARM NEON under qemu-user,
// tests/test_kernels.py::test_standalone_kernels): reads the operands from files, writes the product.
//   standalone OP XTYPE M N K GROUP DIR
//     OP q4 | q8: DIR/x.bin [M, K] (XTYPE f32 | bf16 | f16) x DIR/qweight.bin, DIR/scales.bin -> DIR/out.bin fp32 [M, N]
//     OP bf16:    DIR/x.bin [M, K] bf16 x DIR/w.bin [N, K] bf16 -> DIR/out.bin fp32 [M, N]
//     OP dq4 | dq8: DIR/qweight.bin, DIR/scales.bin -> DIR/out.bin [N, K] (XTYPE f32 or bf16)
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "gemv.h"

static std::vector<char> read(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) { std::perror(path.c_str()); std::exit(2); }
  std::vector<char> data;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) data.insert(data.end(), buf, buf + n);
  std::fclose(f);
  return data;
}

static void write(const std::string& path, const void* p, size_t n) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(p, 1, n, f) != n) { std::perror(path.c_str()); std::exit(2); }
  std::fclose(f);
}

int main(int argc, char** argv) {
  if (argc != 8) { std::fprintf(stderr, "usage: standalone OP XTYPE M N K GROUP DIR\n"); return 2; }
  const std::string op = argv[1], xtype = argv[2], dir = argv[7];
  const int64_t M = std::atoll(argv[3]), N = std::atoll(argv[4]), K = std::atoll(argv[5]), G = std::atoll(argv[6]);
  std::vector<float> out(static_cast<size_t>(M * N));
  auto store = [&](int64_t m, int64_t n, float v) { out[m * N + n] = v; };
  if (op == "q4" || op == "q8") {
    const int bits = op == "q4" ? 4 : 8;
    const auto x = read(dir + "/x.bin"), w = read(dir + "/qweight.bin"), s = read(dir + "/scales.bin");
    gemv::Acts a = gemv::make_acts(M, K, bits);
    if (xtype == "f32") gemv::quantize_rows(reinterpret_cast<const float*>(x.data()), 0, M, a);
    else if (xtype == "bf16") gemv::quantize_rows(reinterpret_cast<const gemv::bf16*>(x.data()), 0, M, a);
    else gemv::quantize_rows(reinterpret_cast<const gemv::f16*>(x.data()), 0, M, a);
    gemv::qgemv_rows(a, reinterpret_cast<const uint8_t*>(w.data()), reinterpret_cast<const uint16_t*>(s.data()), G,
                     0, N, store);
  } else if (op == "bf16") {
    const auto x = read(dir + "/x.bin"), w = read(dir + "/w.bin");
    const gemv::Bf16X p = gemv::prepare_bf16(reinterpret_cast<const uint16_t*>(x.data()), M, K);
    gemv::gemv_bf16_rows(p, reinterpret_cast<const uint16_t*>(w.data()), 0, N, store);
  } else if (op == "dq4" || op == "dq8") {
    const auto w = read(dir + "/qweight.bin"), s = read(dir + "/scales.bin");
    const auto* wp = reinterpret_cast<const uint8_t*>(w.data());
    const auto* sp = reinterpret_cast<const uint16_t*>(s.data());
    const int bits = op == "dq4" ? 4 : 8;
    if (xtype == "f32") {
      std::vector<float> d(static_cast<size_t>(N * K));
      gemv::dequant_rows(wp, sp, bits, K, G, 0, N, d.data());
      write(dir + "/out.bin", d.data(), d.size() * 4);
    } else {
      std::vector<uint16_t> d(static_cast<size_t>(N * K));
      gemv::dequant_rows(wp, sp, bits, K, G, 0, N, d.data());
      write(dir + "/out.bin", d.data(), d.size() * 2);
    }
    return 0;
  } else {
    std::fprintf(stderr, "unknown OP %s\n", op.c_str());
    return 2;
  }
  write(dir + "/out.bin", out.data(), out.size() * 4);
  return 0;
}

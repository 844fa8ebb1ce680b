"""CPU feature detection (gemma4.hardware) and the paths it picks: kernel build and prefill's bf16 GEMM.

The cpuinfo lines are real ones (first processor's flags / Features), cut to the fields the parser reads.
"""
import json

import pytest

from gemma4 import hardware, kernels
from gemma4.cli import main

HASWELL = """model name	: Intel(R) Core(TM) i7-4770 CPU @ 3.40GHz
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc arch_perfmon pebs bts rep_good nopl xtopology nonstop_tsc cpuid aperfmperf pni pclmulqdq dtes64 monitor ds_cpl vmx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand lahf_lm abm cpuid_fault epb invpcid_single pti ssbd ibrs ibpb stibp tpr_shadow vnmi flexpriority ept vpid ept_ad fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid xsaveopt dtherm ida arat pln pts md_clear flush_l1d
"""
SKYLAKE_X = """model name	: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch invpcid_single pti fsgsbase tsc_adjust bmi1 hle avx2 smep bmi2 erms invpcid rtm mpx avx512f avx512dq rdseed adx smap clflushopt clwb avx512cd avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves arat pku ospke md_clear
"""
ICE_LAKE = """model name	: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid aperfmperf tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch invpcid_single ssbd ibrs ibpb stibp ibrs_enhanced fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves wbnoinvd ida arat avx512vbmi pku ospke avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg tme avx512_vpopcntdq rdpid md_clear flush_l1d arch_capabilities
"""
ZEN4 = """model name	: AMD EPYC 9R14 96-Core Processor
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid aperfmperf tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch topoext perfctr_core invpcid_single ssbd ibrs ibpb stibp vmmcall fsgsbase bmi1 avx2 smep bmi2 invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx512_bf16 clzero xsaveerptr rdpru wbnoinvd arat avx512vbmi pku ospke avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid flush_l1d
"""
PI5 = """processor	: 0
BogoMIPS	: 108.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer	: 0x41
CPU part	: 0xd0b
"""
PI4 = """processor	: 0
BogoMIPS	: 108.00
Features	: fp asimd evtstrm crc32 cpuid
CPU part	: 0xd08
"""
GRAVITON3 = """processor	: 0
BogoMIPS	: 2100.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU part	: 0xd40
"""

# (cpuinfo, arch, PyTorch's oneDNN bf16 check, kernel builds best first, native bf16 GEMM)
CASES = [
    (HASWELL, "x86_64", False, ["avx2"], False),
    (SKYLAKE_X, "x86_64", True, ["avx2"], False),  # AVX-512 without VNNI: the AVX2 build; bf16 emulated
    (ICE_LAKE, "x86_64", True, ["avx512_vnni", "avx2"], False),
    (ZEN4, "x86_64", True, ["avx512_bf16", "avx512_vnni", "avx2"], True),
    (PI5, "aarch64", False, ["neon_dotprod", "neon"], False),
    (PI4, "aarch64", False, ["neon"], False),
    (GRAVITON3, "aarch64", True, ["neon_dotprod", "neon"], True),
]


@pytest.mark.parametrize("text,arch,onednn,isas,native", CASES)
def test_paths_follow_the_features(text, arch, onednn, isas, native):
    name, features = hardware.parse_cpuinfo(text)
    cpu = hardware.CPU(arch, name, frozenset(features), "DEFAULT", onednn)
    assert cpu.isas() == isas
    assert cpu.native_bf16() == native
    assert name == (text.split(":", 1)[1].split("\n")[0].strip() if text.startswith("model name") else "")


def test_select_checks_the_choice():
    with pytest.raises(ValueError, match="unknown kernel ISA 'sse4'; one of avx512_bf16, avx512_vnni, avx2"):
        hardware.select(isa="sse4")
    other = "avx2" if hardware.cpu().arch in ("aarch64", "arm64") else "neon"
    with pytest.raises(ValueError, match=f"cannot run the {other} kernels; it can run: "):
        hardware.select(isa=other)
    best = hardware.isa()
    if best is not None:
        hardware.select(isa=hardware.cpu().isas()[-1], native_bf16=not hardware.cpu().native_bf16())
        try:
            assert hardware.isa() == hardware.cpu().isas()[-1] and kernels.native_bf16() != hardware.cpu().native_bf16()
        finally:
            hardware.select()
        assert hardware.isa() == best and kernels.native_bf16() == hardware.cpu().native_bf16()


@pytest.mark.parametrize("env,value,message", [
    ("GEMMA4_ISA", "sse4", "unknown kernel ISA 'sse4'"),
    ("GEMMA4_BF16_GEMM", "yes", "GEMMA4_BF16_GEMM must be 'native' or 'fp32', got 'yes'"),
    ("GEMMA4_HUGEPAGES", "on", "GEMMA4_HUGEPAGES must be 0 or 1, got 'on'"),
])
def test_bad_environment_is_one_clear_error(capsys, monkeypatch, env, value, message):
    monkeypatch.setenv(env, value)
    kernels.reset()
    try:
        assert main(["info", "--hardware"]) == 2
    finally:
        monkeypatch.delenv(env)
        kernels.reset()
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_info_hardware(capsys):
    assert main(["info", "--hardware", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kernel_isas"] == hardware.cpu().isas() and d["kernel_isa"] == hardware.isa()
    assert d["kernels"] == ("built" if kernels.kernel_available() else kernels.unavailable_reason())
    want = "PyTorch bf16 GEMM (native: oneDNN)" if kernels.native_bf16() else "fp32 GEMM over bf16 weight blocks"
    assert d["paths"]["bf16 prefill"] == want
    assert main(["info", "--hardware"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("cpu ") and f"kernel builds                     {', '.join(d['kernel_isas'])}" in table

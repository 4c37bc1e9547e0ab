"""What every benchmark shares: the SFT work (sft_setup), the model-FLOPs count (flops), the
machine's description and where results go (machine), and the report (report).

Scripts under benchmarks/<topic>/ put benchmarks/ on sys.path and import from here:

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from common import sft_setup as S
"""

from mllm_kd.eval.lmms import main

if __name__ == "__main__":
    raise SystemExit(main())

"""llama.cpp's OpenAI-compatible server with doctune's llama.cpp defaults (see runtimes.llama_cpp_safe_defaults).

python -m doctune.llama_server --model model.gguf --host 127.0.0.1 --port 8080 [llama_cpp.server options]
"""

from doctune.runtimes import llama_cpp_safe_defaults

if __name__ == "__main__":
    with llama_cpp_safe_defaults():
        from llama_cpp.server.__main__ import main

        main()

"""Speech to text: LoRA fine-tuning of OpenAI Whisper (openai-whisper + peft).

  config.py    SpeechConfig: data, language/task, LoRA targets, decoder-only training
  audio.py     decoding any audio ffmpeg reads to 16 kHz mono, silence and length checks
  data.py      inspect_data / load_clips: clips + transcripts (metadata.csv or .txt), problems, preview
  model.py     the tiny offline preset, OpenAI's named sizes, local .pt checkpoints, LoRA targets
  pipeline.py  train, load_for_transcription + transcribe (try-it), export (adapter | merged .pt)
"""

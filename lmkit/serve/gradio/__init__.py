"""The gradio chat page (`lmkit serve gradio`)."""

"""The tour guide itself: the tour prompt format (`prompt`), a model behind the API (`engine`), the
FastAPI app and page (`app`, `static/`), the Ray Serve application (`deploy`), teacher-written tours as
a Ray Data batch job into the lake (`tours`, `vllm_tours`), and the page's pre-generated examples
(`examples`); `tourray serve`, `tourray tours generate / examples`."""

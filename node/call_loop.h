// Runs every gRPC call of a node on one thread, through one completion
// queue: the calls the node serves and the push streams it opens.
//
// Why not gRPC's callback API: in gRPC 1.51 the callbacks run on two
// threads that take turns as the epoll poller, and the thread that
// receives an event hands the poller role to the other before it runs the
// callback. So every message woke a second thread: on a two-core machine
// a node switched threads about six times per decoded token, and a third
// of its CPU time went to the kernel. Here one thread polls, runs the
// reaction and starts the next write, and the same node switches about
// twice per token (docs/benchmarks.md).
//
// The reactor classes below keep the shape of gRPC's callback reactors
// (StartRead, StartWrite, Finish, OnReadDone, OnWriteDone, OnDone), so the
// node's per-call logic reads as it would with the callback API.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>

#include <grpcpp/grpcpp.h>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace pollen::node {

// An operation posted to the loop's queue. The loop calls Run with the
// operation's result on its thread.
class CallTag {
 public:
  virtual ~CallTag() = default;
  virtual void Run(bool ok) = 0;
};

// A tag that calls `(owner->*Method)(ok)`.
template <class Owner, void (Owner::*Method)(bool)>
class MemberTag final : public CallTag {
 public:
  explicit MemberTag(Owner* owner) : owner_(owner) {}
  void Run(bool ok) override { (owner_->*Method)(ok); }

 private:
  Owner* const owner_;
};

// Owns a started server and the completion queue of its calls, and runs
// the thread that drives them. Every operation on a call of this server,
// and on any client call started on queue(), completes on that thread.
//
// Starting an operation on a queue that was shut down aborts the process.
// So every object that may still start one (acceptor, reactor, unary call,
// client stream) counts itself as live with AddCall and RemoveCall, and
// the queue shuts down only once none is left.
class CallLoop {
 public:
  CallLoop(std::unique_ptr<grpc::Server> server,
           std::unique_ptr<grpc::ServerCompletionQueue> queue);
  // Calls Stop with a 10 s timeout, which cancels open calls at once
  // unless ShutdownServer ran before.
  ~CallLoop();

  CallLoop(const CallLoop&) = delete;
  CallLoop& operator=(const CallLoop&) = delete;

  grpc::ServerCompletionQueue* queue() const { return queue_.get(); }

  // Starts the thread. Post the server's first call requests before or
  // after.
  void Start();

  void AddCall();
  void RemoveCall();

  // Stops accepting calls and cancels those still open after `grace`. The
  // thread goes on running the ends of the cancelled calls. Idempotent.
  void ShutdownServer(absl::Duration grace);

  // Waits up to `timeout` until no call is live, then shuts the queue
  // down, lets the thread run what is left on it, and joins the thread.
  // Calls ShutdownServer first unless it ran already. When calls are still live
  // after `timeout`, logs them and leaves the queue and the thread running,
  // which is safe for a process about to exit. Idempotent.
  void Stop(absl::Duration timeout);

 private:
  void Run();

  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<grpc::ServerCompletionQueue> queue_;
  std::thread thread_;
  bool server_shut_down_ = false;
  bool stopped_ = false;

  absl::Mutex mu_;
  int live_calls_ ABSL_GUARDED_BY(mu_) = 0;
};

// A bidirectional streaming call accepted by the server.
template <class Request, class Response>
struct ServerStreamCall {
  // Set by the acceptor, which counts the call there once it arrived.
  CallLoop* loop = nullptr;
  grpc::ServerContext context;
  grpc::ServerAsyncReaderWriter<Response, Request> stream{&context};
};

// A unary call accepted by the server. FinishUnary replies and frees it.
template <class Request, class Response>
struct UnaryCall final : public CallTag {
  // Set by the acceptor, which counts the call there once it arrived.
  CallLoop* loop = nullptr;
  grpc::ServerContext context;
  Request request;
  Response response;
  grpc::ServerAsyncResponseWriter<Response> responder{&context};

  // The reply was sent, or the call ended without it.
  void Run(bool /*ok*/) override {
    CallLoop* counted = loop;
    delete this;
    counted->RemoveCall();
  }
};

// Sends `call->response` with `status`, or only `status` when it is not
// OK, and frees the call when gRPC is done with it. Any thread.
template <class Request, class Response>
void FinishUnary(std::unique_ptr<UnaryCall<Request, Response>> call,
                 const grpc::Status& status) {
  UnaryCall<Request, Response>* raw = call.release();
  CallTag* tag = raw;
  if (status.ok()) {
    raw->responder.Finish(raw->response, status, tag);
  } else {
    raw->responder.FinishWithError(status, tag);
  }
}

// Keeps one request for a new call of a method posted on the queue, and
// hands each call that arrives to `on_call` on the loop's thread, after
// posting the request for the next one. Deletes itself when the server
// shuts down.
template <class Call>
class CallAcceptor final : public CallTag {
 public:
  // Posts a request for `call`, with `tag` as its completion:
  // service->RequestX(&call->context, ..., queue, queue, tag).
  using RequestFunction = std::function<void(Call* call, void* tag)>;
  using CallFunction = std::function<void(std::unique_ptr<Call>)>;

  static void Start(CallLoop* loop, RequestFunction request,
                    CallFunction on_call) {
    loop->AddCall();
    auto* acceptor =
        new CallAcceptor(loop, std::move(request), std::move(on_call));
    acceptor->Request();
  }

  void Run(bool ok) override {
    if (!ok) {
      CallLoop* loop = loop_;
      delete this;
      loop->RemoveCall();
      return;
    }
    // The call counts as live until its reactor or reply is done.
    loop_->AddCall();
    std::unique_ptr<Call> call = std::move(call_);
    Request();
    on_call_(std::move(call));
  }

 private:
  CallAcceptor(CallLoop* loop, RequestFunction request, CallFunction on_call)
      : loop_(loop), request_(std::move(request)), on_call_(std::move(on_call)) {}

  void Request() {
    call_ = std::make_unique<Call>();
    call_->loop = loop_;
    request_(call_.get(), static_cast<CallTag*>(this));
  }

  CallLoop* const loop_;
  const RequestFunction request_;
  const CallFunction on_call_;
  std::unique_ptr<Call> call_;
};

// Server side of one bidirectional stream, in the shape of
// grpc::ServerBidiReactor. At most one read and one write are in flight.
// StartRead, StartWrite and Finish may be called from any thread, and the
// reactions run on the loop's thread, one at a time. A Finish called while
// a write is in flight goes out after that write. OnDone runs once the
// finish went out and no read or write is in flight; the subclass may
// delete itself there.
template <class Request, class Response>
class ServerStreamReactor {
 public:
  using Call = ServerStreamCall<Request, Response>;

  // The acceptor counted the call on its loop; OnDone's return ends that.
  explicit ServerStreamReactor(std::unique_ptr<Call> call)
      : call_(std::move(call)) {}
  virtual ~ServerStreamReactor() = default;

  ServerStreamReactor(const ServerStreamReactor&) = delete;
  ServerStreamReactor& operator=(const ServerStreamReactor&) = delete;

  virtual void OnReadDone(bool ok) = 0;
  virtual void OnWriteDone(bool /*ok*/) {}
  virtual void OnDone() = 0;

 protected:
  std::string peer() const { return call_->context.peer(); }

  void StartRead(Request* request) {
    {
      absl::MutexLock lock(&mu_);
      ++in_flight_;
    }
    call_->stream.Read(request, static_cast<CallTag*>(&read_tag_));
  }

  void StartWrite(const Response* response) {
    {
      absl::MutexLock lock(&mu_);
      ++in_flight_;
      writing_ = true;
    }
    call_->stream.Write(*response, static_cast<CallTag*>(&write_tag_));
  }

  // Only the first call counts.
  void Finish(const grpc::Status& status) {
    {
      absl::MutexLock lock(&mu_);
      if (finish_requested_) return;
      finish_requested_ = true;
      if (writing_) {
        deferred_finish_ = status;
        return;
      }
      ++in_flight_;
    }
    call_->stream.Finish(status, static_cast<CallTag*>(&finish_tag_));
  }

 private:
  void ReadDone(bool ok) {
    OnReadDone(ok);
    EndOperation();
  }

  void WriteDone(bool ok) {
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
    }
    OnWriteDone(ok);

    std::optional<grpc::Status> finish;
    {
      absl::MutexLock lock(&mu_);
      if (!writing_ && deferred_finish_.has_value()) {
        finish = std::move(deferred_finish_);
        deferred_finish_.reset();
        ++in_flight_;
      }
    }
    if (finish.has_value()) {
      call_->stream.Finish(*finish, static_cast<CallTag*>(&finish_tag_));
    }
    EndOperation();
  }

  void FinishDone(bool /*ok*/) {
    {
      absl::MutexLock lock(&mu_);
      finished_ = true;
    }
    EndOperation();
  }

  // Ends one operation and runs OnDone after the last.
  void EndOperation() {
    bool done = false;
    {
      absl::MutexLock lock(&mu_);
      --in_flight_;
      done = finished_ && in_flight_ == 0;
    }
    if (!done) return;
    CallLoop* loop = call_->loop;
    OnDone();
    loop->RemoveCall();
  }

  const std::unique_ptr<Call> call_;
  MemberTag<ServerStreamReactor, &ServerStreamReactor::ReadDone> read_tag_{this};
  MemberTag<ServerStreamReactor, &ServerStreamReactor::WriteDone> write_tag_{
      this};
  MemberTag<ServerStreamReactor, &ServerStreamReactor::FinishDone> finish_tag_{
      this};

  absl::Mutex mu_;
  int in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_requested_ ABSL_GUARDED_BY(mu_) = false;
  std::optional<grpc::Status> deferred_finish_ ABSL_GUARDED_BY(mu_);
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

// Client side of one bidirectional stream, in the shape of
// grpc::ClientBidiReactor. Bind the call, then StartCall; a read or write
// started before the call started goes out once it has. The reactor learns
// that the call ended from a read that fails, so it must keep a read
// pending. After that read, it receives the call's status, and OnDone runs
// once no operation is in flight and no hold is left.
template <class Request, class Response>
class ClientStreamReactor {
 public:
  using Stream = grpc::ClientAsyncReaderWriter<Request, Response>;

  ClientStreamReactor() = default;
  virtual ~ClientStreamReactor() = default;

  ClientStreamReactor(const ClientStreamReactor&) = delete;
  ClientStreamReactor& operator=(const ClientStreamReactor&) = delete;

  virtual void OnReadDone(bool ok) = 0;
  virtual void OnWriteDone(bool /*ok*/) {}
  virtual void OnDone(const grpc::Status& status) = 0;

 protected:
  grpc::ClientContext& context() { return context_; }

  // `stream` comes from the stub's PrepareAsyncX(&context(), loop->queue()).
  // The reactor counts itself live on `loop` until OnDone returned.
  void Bind(CallLoop* loop, std::unique_ptr<Stream> stream) {
    loop_ = loop;
    loop_->AddCall();
    stream_ = std::move(stream);
  }

  void StartCall() {
    {
      absl::MutexLock lock(&mu_);
      ++in_flight_;
    }
    stream_->StartCall(static_cast<CallTag*>(&start_tag_));
  }

  void StartRead(Response* response) {
    {
      absl::MutexLock lock(&mu_);
      ++in_flight_;
      if (!started_) {
        pending_read_ = response;
        return;
      }
    }
    stream_->Read(response, static_cast<CallTag*>(&read_tag_));
  }

  void StartWrite(const Request* request) {
    {
      absl::MutexLock lock(&mu_);
      ++in_flight_;
      if (!started_) {
        pending_write_ = request;
        return;
      }
    }
    stream_->Write(*request, static_cast<CallTag*>(&write_tag_));
  }

  void AddHold() {
    absl::MutexLock lock(&mu_);
    ++holds_;
  }

  void RemoveHold() {
    bool done = false;
    {
      absl::MutexLock lock(&mu_);
      --holds_;
      done = Done();
      if (done) done_called_ = true;
    }
    if (done) EndReactor();
  }

 private:
  // Runs OnDone, after which `this` may be gone.
  void EndReactor() {
    CallLoop* loop = loop_;
    OnDone(status_);
    loop->RemoveCall();
  }

  bool Done() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return finished_ && in_flight_ == 0 && holds_ == 0 && !done_called_;
  }

  void StartDone(bool /*ok*/) {
    Response* read = nullptr;
    const Request* write = nullptr;
    {
      absl::MutexLock lock(&mu_);
      started_ = true;
      std::swap(read, pending_read_);
      std::swap(write, pending_write_);
    }
    // A call that failed to start fails these too.
    if (read != nullptr) stream_->Read(read, static_cast<CallTag*>(&read_tag_));
    if (write != nullptr) {
      stream_->Write(*write, static_cast<CallTag*>(&write_tag_));
    }
    EndOperation();
  }

  void ReadDone(bool ok) {
    OnReadDone(ok);
    if (!ok) {
      // The call ended; collect its status.
      {
        absl::MutexLock lock(&mu_);
        ++in_flight_;
      }
      stream_->Finish(&status_, static_cast<CallTag*>(&finish_tag_));
    }
    EndOperation();
  }

  void WriteDone(bool ok) {
    OnWriteDone(ok);
    EndOperation();
  }

  void FinishDone(bool /*ok*/) {
    {
      absl::MutexLock lock(&mu_);
      finished_ = true;
    }
    EndOperation();
  }

  // Ends one operation and runs OnDone when the reactor is done.
  void EndOperation() {
    bool done = false;
    {
      absl::MutexLock lock(&mu_);
      --in_flight_;
      done = Done();
      if (done) done_called_ = true;
    }
    if (done) EndReactor();
  }

  // The stream lives in the call's memory, which the context frees, so it
  // is declared after the context and destroyed before it.
  grpc::ClientContext context_;
  std::unique_ptr<Stream> stream_;
  grpc::Status status_;
  CallLoop* loop_ = nullptr;
  MemberTag<ClientStreamReactor, &ClientStreamReactor::StartDone> start_tag_{
      this};
  MemberTag<ClientStreamReactor, &ClientStreamReactor::ReadDone> read_tag_{this};
  MemberTag<ClientStreamReactor, &ClientStreamReactor::WriteDone> write_tag_{
      this};
  MemberTag<ClientStreamReactor, &ClientStreamReactor::FinishDone> finish_tag_{
      this};

  absl::Mutex mu_;
  int in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  int holds_ ABSL_GUARDED_BY(mu_) = 0;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  Response* pending_read_ ABSL_GUARDED_BY(mu_) = nullptr;
  const Request* pending_write_ ABSL_GUARDED_BY(mu_) = nullptr;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool done_called_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace pollen::node

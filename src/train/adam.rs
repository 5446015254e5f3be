//! Adam with decoupled weight decay (AdamW), written out so that its moments
//! can be saved and restored: candle_nn's `AdamW` keeps them private, and a
//! run that resumes from a checkpoint with fresh moments takes a different
//! path from one that never stopped.
//!
//! The update is candle_nn's (and PyTorch's) exactly: bias-corrected first
//! and second moments, `eps` outside the square root, the decay applied to
//! the parameter before the step.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

/// The hyper-parameters (candle_nn's `ParamsAdamW` defaults but the decay,
/// which the callers here set).
#[derive(Debug, Clone, Copy)]
pub struct AdamParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamParams {
    /// `lr` with the usual betas and epsilon, and no weight decay.
    pub fn new(lr: f64) -> Self {
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The optimiser's state: the step count and each variable's two moments.
pub struct Adam {
    vars: Vec<Var>,
    /// Each variable's learning rate as a multiple of `params.lr`.
    rates: Vec<f64>,
    /// First and second moments, one pair per variable.
    moments: Vec<(Tensor, Tensor)>,
    steps: usize,
    params: AdamParams,
}

impl Adam {
    pub fn new(vars: Vec<Var>, params: AdamParams) -> Result<Self> {
        let rated = vars.into_iter().map(|v| (v, 1.0)).collect();
        Self::with_rates(rated, params)
    }

    /// Each variable with its own learning rate, a multiple of `params.lr`
    /// (parameter groups).
    pub fn with_rates(vars: Vec<(Var, f64)>, params: AdamParams) -> Result<Self> {
        let (vars, rates): (Vec<Var>, Vec<f64>) = vars.into_iter().unzip();
        let moments = vars
            .iter()
            .map(|v| Ok((v.zeros_like()?, v.zeros_like()?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            vars,
            rates,
            moments,
            steps: 0,
            params,
        })
    }

    /// Backpropagates `loss` and moves every variable one step.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.steps += 1;
        let p = self.params;
        let t = self.steps as i32;
        let correct1 = 1.0 - p.beta1.powi(t);
        let correct2 = 1.0 - p.beta2.powi(t);
        for ((var, (m, v)), rate) in self
            .vars
            .iter()
            .zip(self.moments.iter_mut())
            .zip(&self.rates)
        {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let lr = p.lr * rate;
            *m = ((&*m * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            *v = ((&*v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let update =
                ((&*m * (1.0 / correct1))? / ((&*v * (1.0 / correct2))?.sqrt()? + p.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * p.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Sets the base learning rate (each variable's rate multiplies it),
    /// for a schedule.
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// Steps taken (restored ones included).
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Each variable's (first, second) moment, in the order of `vars`.
    pub fn moments(&self) -> &[(Tensor, Tensor)] {
        &self.moments
    }

    /// Puts back a saved state: the step count and the moments, which must
    /// have the variables' shapes.
    pub fn restore(&mut self, steps: usize, moments: Vec<(Tensor, Tensor)>) -> Result<()> {
        if moments.len() != self.vars.len() {
            candle_core::bail!(
                "the saved optimiser has {} variables, this one {}",
                moments.len(),
                self.vars.len()
            );
        }
        for (var, (m, v)) in self.vars.iter().zip(&moments) {
            if m.dims() != var.dims() || v.dims() != var.dims() {
                candle_core::bail!(
                    "a saved moment has shape {:?}, its variable {:?}",
                    m.dims(),
                    var.dims()
                );
            }
        }
        self.steps = steps;
        self.moments = moments;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};

    use super::*;

    /// The same steps as candle_nn's AdamW, to the last bits that float
    /// order allows, with and without weight decay.
    #[test]
    fn it_takes_candle_nn_adamw_steps() -> Result<()> {
        for decay in [0.0, 0.01] {
            let start = Tensor::new(&[[0.5f32, -1.0, 2.0], [0.1, 0.0, -0.3]], &Device::Cpu)?;
            let ours = Var::from_tensor(&start)?;
            let theirs = Var::from_tensor(&start)?;
            let mut params = AdamParams::new(0.05);
            params.weight_decay = decay;
            let mut adam = Adam::new(vec![ours.clone()], params)?;
            let mut reference = AdamW::new(
                vec![theirs.clone()],
                ParamsAdamW {
                    lr: 0.05,
                    weight_decay: decay,
                    ..Default::default()
                },
            )?;
            let target = Tensor::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu)?;
            for _ in 0..20 {
                let loss = |v: &Var| (v.as_tensor() - &target)?.sqr()?.sum_all();
                adam.backward_step(&loss(&ours)?)?;
                reference.backward_step(&loss(&theirs)?)?;
            }
            let diff = (ours.as_tensor() - theirs.as_tensor())?
                .abs()?
                .max_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-6, "decay {decay}: {diff}");
            assert_eq!(adam.steps(), 20);
        }
        Ok(())
    }

    /// Stopping after 5 steps and restoring the state into a fresh
    /// optimiser ends where 10 uninterrupted steps end.
    #[test]
    fn a_restored_state_continues_the_same_path() -> Result<()> {
        let start = Tensor::new(&[1f32, -2.0, 0.5], &Device::Cpu)?;
        let target = Tensor::new(&[0f32, 1.0, 2.0], &Device::Cpu)?;
        let loss = |v: &Var| (v.as_tensor() - &target)?.sqr()?.sum_all();
        let straight = Var::from_tensor(&start)?;
        let mut adam = Adam::new(vec![straight.clone()], AdamParams::new(0.1))?;
        for _ in 0..10 {
            adam.backward_step(&loss(&straight)?)?;
        }
        let first = Var::from_tensor(&start)?;
        let mut before = Adam::new(vec![first.clone()], AdamParams::new(0.1))?;
        for _ in 0..5 {
            before.backward_step(&loss(&first)?)?;
        }
        let second = Var::from_tensor(first.as_tensor())?;
        let mut after = Adam::new(vec![second.clone()], AdamParams::new(0.1))?;
        after.restore(before.steps(), before.moments().to_vec())?;
        for _ in 0..5 {
            after.backward_step(&loss(&second)?)?;
        }
        let a: Vec<f32> = straight.as_tensor().to_vec1()?;
        let b: Vec<f32> = second.as_tensor().to_vec1()?;
        assert_eq!(a, b);
        Ok(())
    }
}
